"""export/external_data.to_proto_array: the emitter's float32 -> float16 / bfloat16 cast."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto

from arx.export import external_data
from arx.export.external_data import to_proto_array

# numpy's own casts of the edge values (the references) overflow to inf on purpose
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


def _edge_values() -> np.ndarray:
    """Normal weights, both half types' subnormals and their rounding ties, overflow, signed
    zeros and infinities: where two correct casts could still round differently."""
    rng = np.random.default_rng(0)
    specials = [0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 5.96e-8,
                6.1e-5, 1e-40, 3.4e38, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 1.0 + 2 ** -8]
    spread = rng.standard_normal(4096) * np.logspace(-42, 38, 4096)
    return np.concatenate([rng.standard_normal(10_000) * 0.02, spread,
                           specials]).astype(np.float32)


@pytest.mark.parametrize("dtype,reference,proto", [
    ("float16", lambda a: a.astype(np.float16).view(np.uint16), TensorProto.FLOAT16),
    ("bfloat16", lambda a: a.astype(ml_dtypes.bfloat16).view(np.uint16), TensorProto.BFLOAT16)])
def test_torch_cast_has_numpys_bits(dtype, reference, proto):
    values = _edge_values()
    out, data_type = to_proto_array(values, dtype)
    assert data_type == proto
    assert np.array_equal(out.view(np.uint16), reference(values))


def test_nan_stays_nan_and_numpy_is_the_fallback(monkeypatch):
    values = np.array([np.nan, 1.5, -2.25], np.float32)
    out, _ = to_proto_array(values, "float16")
    assert np.isnan(out[0]) and out[1:].tolist() == [1.5, -2.25]
    monkeypatch.setattr(external_data, "_torch_cast", lambda array, dtype: None)  # no torch
    fallback, _ = to_proto_array(_edge_values(), "float16")
    assert np.array_equal(fallback, _edge_values().astype(np.float16))


def test_widening_and_transposes_are_exact_and_land_in_numpy_arrays():
    """tensor_source's torch paths: the same values as numpy's, each result a C-contiguous
    array numpy owns (its huge-page allocation, not a view of a torch tensor)."""
    from arx.export.tensor_source import contiguous, widen_bf16

    values = _edge_values()[:12_000].reshape(120, 100)
    bits = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    wide = widen_bf16(bits)
    assert wide.dtype == np.float32 and wide.flags.c_contiguous and wide.base is None
    assert np.array_equal(wide.view(np.uint32), bits.astype(np.uint32) << 16)
    for view in (values.T, values[:, ::3], values[::-1].T):
        got = contiguous(view)
        assert got.flags.c_contiguous and got.base is None
        assert np.array_equal(got.view(np.uint32), np.ascontiguousarray(view).view(np.uint32))
    assert contiguous(values) is values  # already contiguous: not copied
    half, _ = to_proto_array(values.T, "float16")  # a strided input to the cast
    assert half.shape == (100, 120) and np.array_equal(half, values.T.astype(np.float16))
