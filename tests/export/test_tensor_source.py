"""export/tensor_source.py's reads of a safetensors folder: every dtype the emitter takes, the
first rows, the one-copy transposed read (in slabs past SLAB_ROWS), and a file cut short after
its header was read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from arx.errors import ArxError
from arx.export import tensor_source
from arx.export.tensor_source import FirstRows, SafetensorsSource, transposed_float32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.standard_normal((600, 300)).astype(np.float32))
    tensors = {"bf16": base.to(torch.bfloat16), "f16": base.to(torch.float16), "f32": base,
               "small": base[:5, :7].clone(), "ids": torch.arange(12, dtype=torch.int64),
               "norm": base[0].clone()}
    path = tmp_path_factory.mktemp("st")
    save_file(tensors, str(path / "model.safetensors"))
    return path, {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                  for k, v in tensors.items()}


def test_reads_every_dtype_exactly_and_the_first_rows(folder):
    path, expected = folder
    source = SafetensorsSource(path)
    for name, want in expected.items():
        got = source[name]
        assert got.flags.c_contiguous and got.flags.writeable and got.base is None
        assert got.dtype == (np.float32 if want.dtype.kind == "f" else want.dtype)
        assert np.array_equal(got, want), name
    assert np.array_equal(source.first_rows("bf16", 3), expected["bf16"][:3])
    assert source.first_rows("ids", 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["bf16", "f16", "f32", "small"])
def test_transposed_read_is_the_transpose_in_one_copy(folder, name):
    path, expected = folder
    source = SafetensorsSource(path)
    got = source.transposed(name)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.base is None
    assert np.array_equal(got.view(np.uint32), np.ascontiguousarray(expected[name].T).view(np.uint32))
    sliced = FirstRows(source, vocab=600, rows=256)  # dim 0 is "the vocabulary": cut
    assert np.array_equal(sliced.transposed(name), expected[name][:256].T)


def test_slabbed_copy_and_its_torchless_fallback_agree(monkeypatch):
    values = np.random.default_rng(1).standard_normal((700, 2 * tensor_source.SLAB_ROWS + 5))
    bits = values.astype(np.float32).view(np.uint32) >> 16  # bf16 bits: the top halves
    bits = bits.astype(np.uint16)
    want = np.ascontiguousarray((bits.astype(np.uint32) << 16).view(np.float32).T)
    assert np.array_equal(transposed_float32(bits), want)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # no torch installed
    assert np.array_equal(transposed_float32(bits), want)


def test_a_non_matrix_and_a_cut_file_are_one_line_errors(folder, tmp_path):
    path, _ = folder
    with pytest.raises(ArxError, match="not a 2-D float weight"):
        SafetensorsSource(path).transposed("norm")
    copy = tmp_path / "model.safetensors"
    copy.write_bytes((path / "model.safetensors").read_bytes())
    source = SafetensorsSource(tmp_path)
    with open(copy, "r+b") as f:  # cut after the header was checked
        f.truncate(copy.stat().st_size - 1000)
    with pytest.raises(ArxError, match="ends inside tensor"):
        source.transposed(max(source.keys(), key=lambda n: source._where[n][1]))
