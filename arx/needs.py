"""Which optional packages each command and option needs: one table, checked before any work.

`pip install arx` is what an edge device gets: numpy, onnx, onnx-ir (the graph passes),
onnxruntime, tokenizers. That runs `arx generate`, `arx profile`, `arx inspect`, plugin-free
build kits and `arx calibrate --scheme w8a8 --no-plot`. Everything else comes from an extra,
and a command that needs one says which in one line (exit 2) before it loads, times or writes
anything, instead of failing minutes later or in a traceback. `arx inspect --env` prints the
same table with what is installed here.

Modules are found with importlib's finder, not imported: the check costs nothing, and the
commands still import through `arx.errors.require` (which also reports a broken install).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from arx.errors import ArxError

GPU_MODULES = ("tensorrt|tensorrt_bindings", "cuda.bindings|cuda.cudart")


@dataclass(frozen=True)
class Need:
    command: str
    # (option, wanted), all must hold: True / False = the option is set / unset, a tuple = its
    # value is one of these. Options are the command's argparse names, or values the command
    # derives and passes to check() (build's `uses_plugins`).
    when: tuple[tuple[str, Any], ...]
    modules: tuple[str, ...]  # import names; "a|b": either one
    extra: str | None  # the extra that installs them; None: a base requirement of arx
    purpose: str  # what needs them, as the user asked for it
    instead: str = ""  # how to do without, appended to the message
    optional: bool = False  # the command falls back without them: shown by inspect --env only


NEEDS = (
    Need("export", (), ("torch", "transformers", "safetensors", "onnxscript"), "export",
         "arx export"),
    Need("export", (), ("onnxruntime_extensions",), "export", "tokenizer.onnx in exported bundles",
         "without it arx export writes tokenizer.json only", optional=True),
    Need("calibrate", (("no_plot", False),), ("matplotlib",), "calibrate",
         "the accuracy plot of arx calibrate (reports/accuracy.png)", "or pass --no-plot"),
    Need("profile", (("plot", True),), ("matplotlib",), "plot", "arx profile --plot"),
    Need("generate", (("engine", True),), GPU_MODULES, "gpu", "arx generate --engine"),
    Need("profile", (("engine", True),), GPU_MODULES, "gpu", "arx profile --engine"),
    Need("serve", (), ("fastapi", "uvicorn", "jinja2"), "serve", "arx serve"),
    Need("serve", (("engine", True),), GPU_MODULES, "gpu", "arx serve --engine"),
    Need("serve", (("ray", True),), ("ray",), "ray", "arx serve --ray"),
    Need("build", (("uses_plugins", True), ("no_ptx", False)), ("triton",), "kernels",
         "the plugin kernels of arx build", "or pass --no-ptx (a kit without PTX) or --no-plugins"),
    Need("build", (("kit", False),), GPU_MODULES[:1], "gpu", "an engine from arx build",
         "without it (or without a GPU) arx build writes a build kit", optional=True),
)


def installed(module: str) -> bool:
    """Whether `module` (or one of "a|b") can be imported, without importing it."""
    for name in module.split("|"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):  # a missing parent package, a module set to None
            continue
    return False


def missing(need: Need) -> list[str]:
    return [m for m in need.modules if not installed(m)]


def applies(need: Need, options: dict[str, Any]) -> bool:
    for name, wanted in need.when:
        value = options.get(name)
        if isinstance(wanted, tuple):
            if value not in wanted:
                return False
        elif bool(value) != wanted:
            return False
    return True


def check(command: str, args: Any = None, **derived: Any) -> None:
    """Fail in one line, naming the extra, when an option asked for needs a missing package."""
    options = {**vars(args), **derived} if args is not None else dict(derived)
    for need in NEEDS:
        if need.command == command and not need.optional and applies(need, options):
            absent = missing(need)
            if absent:
                raise ArxError(message(need, absent))
    if options.get("device", "cpu") != "cpu":  # --device cuda/auto needs a build, not a module
        from arx.environment import check_device

        check_device(options["device"])


def message(need: Need, absent: list[str]) -> str:
    names = ", ".join(f"'{m.split('|')[0]}'" for m in absent)
    what = f"the Python package {names}, which is" if len(absent) == 1 else \
        f"the Python packages {names}, which are"
    fix = (f"install {'it' if len(absent) == 1 else 'them'} with: pip install 'arx[{need.extra}]'"
           if need.extra else "arx requires it: reinstall arx with its dependencies "
                              "(pip install --force-reinstall arx)")
    return f"{need.purpose} needs {what} not installed; {fix}" + \
        (f", {need.instead}" if need.instead else "")


def table() -> list[dict[str, Any]]:
    """Every row with what is missing here (for arx inspect --env)."""
    return [{"command": n.command, "purpose": n.purpose, "extra": n.extra, "optional": n.optional,
             "modules": [m.split("|")[0] for m in n.modules],
             "missing": [m.split("|")[0] for m in missing(n)]} for n in NEEDS]
