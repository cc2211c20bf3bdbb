"""arx build and a bundle whose cache --kv-dtype rewrote: refused in one line, nothing written."""

from __future__ import annotations

import shutil

import pytest

from arx.builder.build import build_bundle
from arx.builder.options import BuildOptions
from arx.errors import ArxError
from arx.export.kv_dtype import convert_export
from arx.manifest import read_manifest


@pytest.mark.parametrize("flag", ["fp16", "int8"])
def test_build_refuses_a_converted_cache(flag, exported_bundle, tmp_path):
    bundle = tmp_path / "b.arx"
    shutil.copytree(exported_bundle("llama"), bundle)
    convert_export(bundle, read_manifest(bundle), flag).write(bundle)
    with pytest.raises(ArxError, match="KV cache of --kv-dtype, which arx build has no TensorRT"):
        build_bundle(bundle, BuildOptions(target="orin", kit=True, progress=False))
    assert not (bundle / "kits").exists() and not (bundle / "engines").exists()
