"""What arx runs on here: the onnxruntime build and providers, and which extras are installed.

onnxruntime ships as several wheels (onnxruntime, onnxruntime-gpu, ...) that all install the
same `onnxruntime` module. With two installed, the one installed last owns the files, silently,
and a later upgrade of either swaps it again (onnxruntime's install notes: keep only one). pip
cannot express "instead of" (an extra cannot remove a base requirement), so arx keeps the CPU
wheel as its requirement, switches to the GPU build by uninstalling both and installing
onnxruntime-gpu (GPU_SWITCH), and reports a second wheel wherever it matters: here (`arx
inspect --env`) and when --device cuda/auto picks a provider.
"""

from __future__ import annotations

import platform
import re
import sys
from typing import Any

from arx.errors import ArxError

ORT_MODULE = "onnxruntime"
CUDA_PROVIDER = "CUDAExecutionProvider"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ort_distributions() -> list[tuple[str, str]]:
    """(name, version) of every installed distribution that provides the `onnxruntime` module
    (onnxruntime-extensions and onnxruntime-genai install other modules and are not counted)."""
    from importlib import metadata

    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = _normalized(dist.metadata["Name"] or "")
        if not name.startswith(ORT_MODULE):
            continue
        top_level = (dist.read_text("top_level.txt") or "").split()
        if ORT_MODULE in top_level or any(str(f) == f"{ORT_MODULE}/__init__.py"
                                          for f in dist.files or ()):
            found[name] = dist.version
    return sorted(found.items())


def pinned_ort_version() -> str | None:
    """The onnxruntime version arx requires (pyproject.toml), which the GPU wheel must match."""
    from importlib import metadata

    try:
        requirements = metadata.requires("arx") or []
    except metadata.PackageNotFoundError:
        return None
    for req in requirements:
        m = re.fullmatch(r"onnxruntime\s*==\s*([\w.]+)", req.split(";")[0].strip())
        if m:
            return m.group(1)
    return None


def gpu_switch(version: str | None = None) -> str:
    """The commands that leave exactly one onnxruntime wheel installed: its GPU build."""
    version = version or pinned_ort_version()
    pin = f"=={version}" if version else ""
    return f"pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu{pin}"


def ort_conflict(dists: list[tuple[str, str]]) -> str | None:
    """One line when more than one onnxruntime wheel is installed, else None."""
    if len(dists) < 2:
        return None
    names = " and ".join(f"{n} {v}" for n, v in dists)
    return (f"{names} are installed together and both own the onnxruntime module (the one "
            f"installed last wins, an upgrade can swap it); keep one, for the GPU build: "
            f"{gpu_switch()}")


def check_device(device: str) -> None:
    """--device cuda without onnxruntime's GPU build fails in one line saying how to get it;
    with cuda or auto, a second onnxruntime wheel is warned about (which build runs is luck)."""
    import onnxruntime as ort

    conflict = ort_conflict(ort_distributions())
    if device == "cuda" and CUDA_PROVIDER not in ort.get_available_providers():
        why = conflict or f"switch to it with: {gpu_switch()}"
        raise ArxError(f"--device cuda needs onnxruntime's GPU build and a CUDA GPU, and this "
                       f"onnxruntime is the {ort.get_device()} build; {why}; or use --device cpu")
    if conflict:
        print(f"arx: warning: {conflict}", file=sys.stderr)


def ort_info() -> dict[str, Any]:
    dists = ort_distributions()
    info: dict[str, Any] = {"distributions": [{"name": n, "version": v} for n, v in dists],
                            "conflict": ort_conflict(dists)}
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {**info, "error": f"onnxruntime does not import ({e}); reinstall arx"}
    return {**info, "version": ort.__version__, "build": ort.get_device(),
            "providers": list(ort.get_available_providers())}


def environment() -> dict[str, Any]:
    from arx import __version__, needs

    return {"arx": __version__, "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "onnxruntime": ort_info(), "extras": needs.table()}


def format_environment(env: dict[str, Any]) -> list[str]:
    ort = env["onnxruntime"]
    lines = [f"arx          {env['arx']}, Python {env['python']}, {env['platform']}"]
    dists = ", ".join(f"{d['name']} {d['version']}" for d in ort["distributions"]) or "none found"
    if "error" in ort:
        lines.append(f"onnxruntime  {ort['error']} (distributions: {dists})")
    else:
        lines += [f"onnxruntime  {ort['version']}, {ort['build']} build (distributions: {dists})",
                  f"providers    {', '.join(ort['providers'])}"]
        if CUDA_PROVIDER not in ort["providers"]:
            lines.append(f"             --device cuda needs the GPU build: {gpu_switch()}")
    if ort["conflict"]:
        lines.append(f"warning      {ort['conflict']}")
    lines.append("extras       what each command or option needs, and what is missing here")
    for row in env["extras"]:
        state = "missing" if row["missing"] else "ok"
        extra = f"arx[{row['extra']}]" if row["extra"] else "arx"
        note = " (optional)" if row["optional"] else ""
        lines.append(f"  {state:<8} {row['purpose'] + note:<58} {extra:<14} "
                     f"{', '.join(row['missing'] or row['modules'])}")
    return lines
