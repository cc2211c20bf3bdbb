"""Every TensorRT API name arx's thin TensorRT layer uses exists in TensorRT 11.4's bindings.

TensorRT's libraries cannot be installed on these machines, so nothing here can call the API.
But the bindings wheel (tensorrt-cu13-bindings, in the dev extra) carries the pybind module,
whose class, method, property and enum member names are strings inside tensorrt.so, and
`tensorrt.plugin` as Python source. Read without importing either: a misspelt method, a renamed
enum member or a tensorrt.plugin name that does not exist fails here, in CI, without a GPU.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
# file -> expressions whose attributes are TensorRT API (ast.unparse of the attribute's base)
TRT_OBJECTS = {
    "builder/trt_build.py": {"trt", "trt.BuilderFlag", "trt.IProgressMonitor", "trt.Logger",
                             "trt.MemoryPoolType", "builder", "config", "network", "parser",
                             "p", "cache"},
    "runtime/tensorrt_backend.py": {"trt", "trt.Logger", "trt.TensorIOMode", "self.engine",
                                    "self.context", "self.runtime"},
    "plugins/trt_contract.py": {"trt"},
    "builder/kit.py": set(),  # the build plan names HardwareCompatibilityLevel.AMPERE_PLUS
}
# enum members and flags named by strings (getattr(trt.X, NAME)); checked the same way
STRING_NAMES = {"builder/trt_build.py", "builder/kit.py"}
# tensorrt.plugin objects in trt_contract.py: the module, TensorDesc, KernelLaunchParams, SymInt
TRTP_OBJECTS = {"trtp", "q", "k_new", "k_cache", "v_cache", "logits", "params", "launch", "d"}


def _bindings() -> Path:
    spec = importlib.util.find_spec("tensorrt_bindings")  # finds the folder; runs nothing
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorrt-cu13-bindings is not installed (the dev extra installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def _used(path: str, bases: set[str]) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    names = {n.attr for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and ast.unparse(n.value) in bases}
    if path in STRING_NAMES:
        names |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                  and isinstance(n.value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]{3,}", n.value)}
    return names


def _in_binary(blob: bytes, name: str) -> bool:
    """`name` as a word of the binary's strings; after "_" too, since the linker stores a string
    that ends another one as that one's tail ("INPUT" lives inside "CONDITIONAL_INPUT")."""
    return re.search(rb"(?<![A-Za-z0-9])" + name.encode() + rb"(?![A-Za-z0-9_])", blob) is not None


@pytest.mark.parametrize("path", sorted(TRT_OBJECTS))
def test_tensorrt_names_exist_in_the_bindings(path):
    blob = (_bindings() / "tensorrt.so").read_bytes()
    used = _used(path, TRT_OBJECTS[path])
    assert used, path  # the scan found the API calls
    missing = sorted(n for n in used if not _in_binary(blob, n))
    assert not missing, f"{path} uses names TensorRT 11.4's bindings do not have: {missing}"


def test_tensorrt_plugin_names_exist():
    """tensorrt.plugin's public API is what its modules export with @public_api(); the
    attributes of its objects are the names its classes define."""
    plugin = _bindings() / "plugin"
    public, defined = set(), set()
    for src in plugin.glob("*.py"):
        with warnings.catch_warnings():  # its docstrings hold "\s" escapes
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            tree = ast.parse(src.read_bytes())
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                defined.add(n.name)
                if any("public_api" in ast.unparse(d) for d in n.decorator_list):
                    public.add(n.name)
            elif isinstance(n, ast.Call) and ast.unparse(n.func).startswith("public_api"):
                public |= {k.value.value for k in n.keywords if k.arg == "symbol"}
            elif isinstance(n, ast.Attribute) and ast.unparse(n.value) == "self":
                defined.add(n.attr)
    tree = ast.parse((ROOT / "plugins/trt_contract.py").read_text())
    uses = {(ast.unparse(n.value), n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and ast.unparse(n.value) in TRTP_OBJECTS}
    module = {attr for base, attr in uses if base == "trtp"}
    members = {attr for base, attr in uses if base != "trtp"}
    assert {"register", "aot_impl", "KernelLaunchParams"} <= module
    assert not module - public, f"not in tensorrt.plugin's public API: {sorted(module - public)}"
    assert not members - defined, f"not defined by tensorrt.plugin: {sorted(members - defined)}"
