"""A stand-in for `tensorrt.plugin`, enough to run the arx registrations without TensorRT.

It records what is registered and checks every impl/aot_impl/autotune signature against the
registered one with the rule tensorrt.plugin 11.x applies (tensorrt_bindings/plugin/_validate.py):
tensors, then a subset of the attributes in registration order, then the fixed trailing names.
Shape expressions are constant ints (TensorRT's are symbolic; the launch math is the same).
"""

from __future__ import annotations

import inspect
import types


class Expr(int):
    """A constant shape/size expression."""

    is_constant = True

    @property
    def constant_value(self) -> int:
        return int(self)


class TensorDesc:
    def __init__(self, shape, dtype="HALF"):
        self.shape_expr = tuple(Expr(d) for d in shape)
        self.dtype = types.SimpleNamespace(name=dtype)
        self.alias = False

    def like(self):
        return TensorDesc(self.shape_expr, self.dtype.name)

    def aliased(self):
        out = self.like()
        out.alias = True
        return out


class KernelLaunchParams:
    grid_x = grid_y = grid_z = 1
    block_x = block_y = block_z = 1
    shared_mem = 0


class SymInt32:
    def __init__(self, value):
        self.value = int(value)


class SymIntExprs(list):
    def __init__(self, n):
        super().__init__([None] * n)


class AutoTuneCombination:
    def __init__(self, types_, layouts, tactics=None):
        self.types, self.layouts, self.tactics = types_, layouts, tactics


def cdiv(a, b):
    return -(-a // b)


def from_shape_expr(shape, dtype=None):
    return TensorDesc(shape, getattr(dtype, "name", "INT32"))


class FakeTrtp:
    """Module-like object: register/autotune/impl/aot_impl decorators plus the types above."""

    TensorDesc, KernelLaunchParams, SymInt32, SymIntExprs = (TensorDesc, KernelLaunchParams,
                                                             SymInt32, SymIntExprs)
    AutoTuneCombination = AutoTuneCombination
    cdiv = staticmethod(cdiv)
    from_shape_expr = staticmethod(from_shape_expr)

    def __init__(self):
        self.op = types.SimpleNamespace()
        self.plugins: dict[str, dict] = {}

    def register(self, plugin_id):
        def deco(fn):
            ns, name = plugin_id.split("::")
            space = getattr(self.op, ns, None) or types.SimpleNamespace()
            setattr(self.op, ns, space)
            if hasattr(space, name):
                raise ValueError(f"already has a definition for {name}")
            params = inspect.signature(fn).parameters.values()
            tensors = [p.name for p in params if p.annotation is TensorDesc]
            attrs = [p.name for p in params if p.annotation is not TensorDesc]
            self.plugins[plugin_id] = dict(describe=fn, tensors=tensors, attrs=attrs)
            setattr(space, name, fn)
            return fn
        return deco

    def _check(self, plugin_id, fn, tail_options):
        p = self.plugins[plugin_id]
        names = list(inspect.signature(fn).parameters)
        n = len(p["tensors"])
        attrs = [a for a in names[n:] if a in p["attrs"]]
        assert names[:n] == p["tensors"], f"{fn.__name__}: tensors {names[:n]}"
        assert attrs == [a for a in p["attrs"] if a in attrs], f"{fn.__name__}: attribute order"
        assert names[n + len(attrs):] in tail_options, f"{fn.__name__}: {names}"

    def _decorator(self, kind, tails):
        def outer(plugin_id):
            def deco(fn):
                self._check(plugin_id, fn, tails)
                self.plugins[plugin_id][kind] = fn
                return fn
            return deco
        return outer

    @property
    def autotune(self):
        return self._decorator("autotune", [["outputs"]])

    @property
    def impl(self):
        return self._decorator("impl", [["outputs", "stream"], ["outputs", "stream", "tactic"]])

    @property
    def aot_impl(self):
        return self._decorator("aot_impl", [["outputs", "tactic"]])


FAKE_TRT = types.SimpleNamespace(int32=types.SimpleNamespace(name="INT32"))
