"""ExportOptions: --kv-dtype with a --dtype export is refused before any work, in one line."""

from __future__ import annotations

import pytest

from arx.errors import ArxError
from arx.export.exporter import ExportOptions


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_kv_dtype_with_a_dtype_export_is_refused(dtype, kv):
    with pytest.raises(ArxError, match="--kv-dtype rewrites an fp32 export's cache"):
        ExportOptions(dtype=dtype, kv_dtype=kv)


def test_kv_dtype_alone_and_dtype_alone_are_fine():
    assert ExportOptions(kv_dtype="int8").kv_dtype == "int8"
    assert ExportOptions(dtype="float16").kv_dtype == "fp32"
