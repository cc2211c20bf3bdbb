"""A failed TensorRT parse or build inside `arx build` is one ArxError line, not a traceback."""

from __future__ import annotations

import pytest
from form_runs import form_for

from arx.builder import trt_build
from arx.builder.engine import build_engine_files
from arx.builder.options import BuildOptions
from arx.errors import ArxError
from arx.manifest import read_manifest


@pytest.mark.parametrize("failure", ["TensorRT could not parse decoder.trt.onnx:\n  In node 3",
                                     "TensorRT failed to build the engine (see its log above)"])
def test_trt_failures_become_one_line(exported_bundle, tmp_path, monkeypatch, failure):
    bundle = exported_bundle("llama")
    form = form_for(bundle, attention="native", sampler="argmax")

    def fail(*args, **kwargs):
        raise RuntimeError(failure)

    monkeypatch.setattr(trt_build, "build_engine", fail)
    options = BuildOptions(target="h100", max_seq_len=24, attention="native", sampler="argmax")
    with pytest.raises(ArxError) as e:
        build_engine_files(tmp_path, form, options, tmp_path / "timing.cache", bundle,
                           read_manifest(bundle))
    message = str(e.value)
    assert message.startswith(failure.splitlines()[0]) and "--kit" in message
    assert "\n" not in message
