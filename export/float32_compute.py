"""A half-precision PyTorch model run with float32 arithmetic, its weights left as they are stored.

The accuracy gate of `arx export --quantize` compares the bundle with the checkpoint's model,
loaded in the checkpoint's dtype (bf16 or fp16) so that it fits beside the checkpoint (an fp32
copy of a 1B model is 5 GB more; export/budget.py). On a CPU without native bf16 (no AVX512-BF16
or AMX: most AMD and Intel before Sapphire Rapids) PyTorch's bf16 matrix products are emulated
and slow: 6.5 s per 128-token sequence of the 1B shape on an Ice Lake, 7 s for the 300M one on an
AVX2 EPYC, where float32 takes a fraction of that. Under `float32_compute()` every matrix product
runs in float32 on upcast copies of its half-precision operands (one weight at a time, freed
after the op), embeddings are looked up in their dtype and upcast, an op that mixes half and
float32 operands upcasts the half ones, and a cast to a half dtype (`x.to(weight.dtype)`, as
transformers' grouped MoE experts do) keeps float32. Activations therefore stay float32 throughout: the
reference is the stored weights computed exactly (the 300M shape's logits equal its float32
model's), at the float32 model's speed (1.36 s a sequence against 1.27 for the float32 model and
5.95 in bf16, AVX2 EPYC). Where the CPU has bf16 in hardware (native_half) the model's own
dtype stays faster and is used. In-place ops are left alone (an upcast copy of their target
would drop the write).
"""

from __future__ import annotations

import contextlib


def native_half(dtype: str) -> bool:
    """Whether this CPU computes `dtype` ("bfloat16", "float16") in hardware, as PyTorch sees it
    (AVX512-BF16 or AMX for bf16; AMX-FP16 for fp16): there the model's own dtype is faster."""
    import torch

    cpu = torch.cpu
    checks = {"bfloat16": ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
              "float16": ("_is_amx_fp16_supported",)}.get(dtype, ())
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def _compute_ops():
    import torch
    import torch.nn.functional as F

    ops = {F.linear, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm,
           torch.addmm, torch.baddbmm, torch.einsum, torch.Tensor.matmul,
           torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm}
    # the MoE experts' grouped products (transformers' grouped_mm experts)
    ops |= {f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f}
    return ops


def _in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or name.startswith("__i") or \
        (name.endswith("_") and not name.endswith("__"))


@contextlib.contextmanager
def float32_compute():
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves, tree_map_only

    half = (torch.bfloat16, torch.float16)
    compute = _compute_ops()
    embeddings = {F.embedding}

    def up(t):
        return t.float() if t.dtype in half else t

    def to_float(x):
        return torch.float32 if x in half else x

    casts = {torch.Tensor.to}  # a cast of an activation to the weights' dtype stays float32
    narrowing = {torch.Tensor.bfloat16, torch.Tensor.half}

    class Float32Compute(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in embeddings:
                return up(func(*args, **kwargs))
            if func in narrowing:
                return args[0].float()
            if func in casts:
                args, kwargs = tree_map_only(torch.dtype, to_float, (args, kwargs))
            if not _in_place(func):
                tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
                if any(t.dtype in half for t in tensors) and (
                        func in compute or any(t.dtype == torch.float32 for t in tensors)):
                    args, kwargs = tree_map_only(torch.Tensor, up, (args, kwargs))
            return func(*args, **kwargs)

    with Float32Compute():
        yield
