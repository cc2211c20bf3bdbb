"""int8 KV cache on the embedded model (models/arx-tiny) against held-out text, behind the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arx.calibration.calibrator import calibrate_bundle
from arx.calibration.evaluate import model_metrics
from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions
from arx.errors import ArxError
from arx.export.exporter import ExportOptions, export_model
from arx.manifest import read_manifest

TINY = Path(__file__).resolve().parents[2] / "models" / "arx-tiny"
GATE = 0.02  # the w8 schemes' default perplexity gate


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "tiny.arx"
    export_model(source=TINY, output=out, options=ExportOptions(progress=False))
    return out


def _options(**kw) -> CalibrateOptions:
    data = DataOptions(path=str(TINY / "calib.txt"), eval_path=str(TINY / "eval.txt"),
                       samples=32, eval_samples=16)
    return CalibrateOptions(quant=QuantOptions(scheme="w8"), data=data, progress=False,
                            plot=False, **kw)


def test_calibrate_int8_cache_within_the_gate(tiny_fp32, tmp_path):
    out = tmp_path / "tiny-w8-kv8.arx"
    result = calibrate_bundle(bundle=tiny_fp32, output=out, options=_options(kv_dtype="int8"))
    assert result.report.passed
    kv = result.report.kv  # the cache alone, fp32 weights, vs the fp32 cache
    assert kv is not None and kv.ppl_increase < GATE and kv.top1_agreement > 0.98
    assert "int8 KV cache alone" in result.table
    m = read_manifest(out)
    assert (m.kv.dtype, m.kv.scales) == ("int8", "per_channel")
    assert m.extensions["kv_cache"]["scales_from"]["kind"] == "text"
    saved = json.loads((out / "reports" / "accuracy.json").read_text())
    assert saved["kv_cache_only"]["kv_dtype"] == "int8"
    assert saved["kv_cache_only"]["perplexity"]["increase"] == pytest.approx(kv.ppl_increase)


def test_export_int8_cache_within_the_gate_on_held_out_text(tiny_fp32, tmp_path):
    """arx export --kv-dtype int8 (scales from random ids) on the embedded model: held-out
    text's perplexity within the gate of the fp32 cache."""
    from arx.calibration.data import load_samples

    out = tmp_path / "tiny-kv8.arx"
    export_model(source=TINY, output=out, options=ExportOptions(progress=False, kv_dtype="int8"))
    m = read_manifest(out)
    assert m.kv.dtype == "int8" and m.extensions["kv_cache"]["scales_from"]["kind"] == "random"
    samples = load_samples(tiny_fp32, read_manifest(tiny_fp32), _options().data, need_calib=0)
    metrics = model_metrics(tiny_fp32, out, samples.eval, progress=False)
    assert metrics.ppl_increase < GATE and metrics.top1_agreement > 0.97


def test_bad_kv_dtype_is_one_line(tmp_path):
    with pytest.raises(ArxError, match="--kv-dtype must be one of fp32, fp16, int8"):
        _options(kv_dtype="int4")


def test_an_int8_cache_bundle_is_not_converted_again(tiny_fp32, tmp_path):
    from arx.export.kv_dtype import convert_bundle

    out = tmp_path / "tiny-fp16.arx"
    calibrate_bundle(bundle=tiny_fp32, output=out, options=_options(kv_dtype="fp16"))
    with pytest.raises(ArxError, match="cannot be converted; start from an fp32 export"):
        convert_bundle(out, read_manifest(out), "int8")


def test_gate_refusal_measures_remedies_with_the_cache(tiny_fp32, tmp_path):
    """Over the gate, the remedies are measured on decoders with the same int8 cache (the
    output bundle's layout), and nothing is written."""
    from arx.calibration.options import QuantOptions

    out = tmp_path / "tiny-w4-kv8.arx"
    options = _options(kv_dtype="int8", max_ppl_increase=1e-6)
    options = CalibrateOptions(**{**options.__dict__, "quant": QuantOptions(scheme="w4")})
    with pytest.raises(ArxError, match=r"over the 0\.0001% gate.*measured"):
        calibrate_bundle(bundle=tiny_fp32, output=out, options=options)
    assert not out.exists()
