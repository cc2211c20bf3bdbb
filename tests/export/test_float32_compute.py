"""export/float32_compute.py: a half-precision model computed in float32 gives the float32 model's
logits (its weights upcast exactly), for every family's code path, the MoE routers included."""

from __future__ import annotations

import copy

import pytest
from tiny_models import FAMILIES

from arx.export.float32_compute import float32_compute, native_half


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_weights_in_float32_equal_the_float32_model(family, dtype, hf_model_dir):
    import torch

    _, model = hf_model_dir(family)
    half = copy.deepcopy(model).to(getattr(torch, dtype))
    exact = copy.deepcopy(half).float()  # the same stored weights, as float32
    ids = torch.tensor([[1, 17, 33, 99, 5, 12, 80, 41], [1, 64, 3, 3, 9, 31, 2, 7]])
    with torch.no_grad():
        want = exact(input_ids=ids, use_cache=False).logits
        with float32_compute():
            got = half(input_ids=ids, use_cache=False).logits
        plain = half(input_ids=ids, use_cache=False).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert all(p.dtype == getattr(torch, dtype) for p in half.parameters())  # weights untouched
    assert plain.dtype == getattr(torch, dtype)  # the mode is gone after the block


def test_in_place_writes_into_half_tensors_are_kept():
    import torch

    cache = torch.zeros(4, dtype=torch.bfloat16)
    with float32_compute():
        cache[1:3] = torch.tensor([1.5, 2.5])
        cache.add_(torch.ones(4))
    assert cache.tolist() == [1.0, 2.5, 3.5, 1.0] and cache.dtype == torch.bfloat16


def test_native_half_is_a_bool_for_each_dtype():
    assert all(isinstance(native_half(d), bool) for d in ("bfloat16", "float16", "float32"))
    assert native_half("float32") is False
