"""`arx calibrate` on a next-scale (VAR) bundle: its own drawn images are the data.

The bundle is the VAR-shaped test module (tests/var_model.py, 5 scales, 66 tokens a image) with
random weights. What is checked: the metrics are the ones the sampler sees (the fp32 bundle
scored against itself is exact; the teacher-forced guided log-probs pick the greedy tokens), the
quantized bundles run the scale loop and stay close to fp32, the ranges are calibrated on the
step graph a scale step runs, a cached calibration reproduces the decoder byte for byte, the
gate refuses with a measured remedy, and bad input stops with one line. The accuracy of a
trained model after quantization is measured on models/arx-var-digits (README, "Calibrating a
next-scale bundle").
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from cli_lines import assert_one_line

from arx.calibration import next_scale
from arx.calibration.calibrator import calibrate_bundle
from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions
from arx.errors import ArxError
from arx.manifest import read_manifest
from arx.runtime.decoder import DecoderSession
from arx.runtime.sampler import SamplingOptions
from arx.runtime.var_generate import VarOptions, VarStages, generate_var, var_info

# least top-1 agreement with fp32 over the held-out positions, by scheme (random weights)
TOP1 = {"w8a8": 0.80, "w8": 0.90, "w4": 0.70}
DATA = DataOptions(samples=8, eval_samples=4)


def _options(scheme: str, **kw) -> CalibrateOptions:
    return CalibrateOptions(quant=QuantOptions(scheme=scheme, group_size=16),
                            data=kw.pop("data", DATA), progress=False, plot=False,
                            force=kw.pop("force", True), **kw)


@pytest.fixture(scope="module")
def var_bundle(var_export):
    return var_export[1]


@pytest.fixture(scope="module")
def calibrated(var_bundle):
    return {s: calibrate_bundle(bundle=var_bundle, output=var_bundle.with_name(f"var-{s}.arx"),
                                options=_options(s)) for s in TOP1}


def _greedy(bundle, classes, cfg=2.0):
    m = read_manifest(bundle)
    with DecoderSession(bundle) as s, VarStages(bundle, m, var_info(m)) as st:
        return generate_var(s, st, classes, VarOptions(cfg, SamplingOptions(do_sample=False)))


def test_the_fp32_bundle_against_itself_is_exact(var_bundle):
    samples = next_scale.load_image_samples(var_bundle, read_manifest(var_bundle), DATA)
    refs = next_scale.draw_references(var_bundle, samples, progress=False)
    m = next_scale.image_metrics(var_bundle, var_bundle, samples, refs, progress=False)
    assert m.tokens == 4 * 66
    assert m.ppl_increase == 0.0 and m.top1_agreement == 1.0 and abs(m.kl_mean) < 1e-12


def test_the_forced_guided_log_probs_pick_the_greedy_tokens(var_bundle):
    """The metrics score the mix the sampler draws from: teacher-forced on greedy tokens, the
    argmax of every scale's guided log-probs is that scale's greedy token."""
    classes = [1, 4, 9]
    greedy = _greedy(var_bundle, classes, cfg=read_manifest(var_bundle).extensions["var"]["cfg_scale"])
    tokens = [t.reshape(len(classes), -1) for t in greedy.tokens]
    with next_scale._Opened(var_bundle) as fp:
        lps = next_scale.forced_log_probs(fp, classes, tokens)
    for k, (lp, t) in enumerate(zip(lps, tokens)):
        assert np.array_equal(lp.argmax(-1), t), f"scale {k}"
        assert np.allclose(np.exp(lp).sum(-1), 1.0)


def test_images_are_drawn_by_class_and_seed_reproducibly(var_bundle, tmp_path):
    manifest = read_manifest(var_bundle)
    (tmp_path / "classes.txt").write_text("3\n7\n")
    opts = DataOptions(path=str(tmp_path / "classes.txt"), samples=3, eval_samples=2, seed=5)
    samples = next_scale.load_image_samples(var_bundle, manifest, opts)
    assert [tuple(r) for r in samples.calib] == [(3, 5), (7, 6), (3, 7)]
    assert [int(r[0]) for r in samples.eval] == [3, 7]
    assert {int(r[1]) for r in samples.eval}.isdisjoint(int(r[1]) for r in samples.calib)
    a, b = (next_scale.draw_references(var_bundle, samples, progress=False) for _ in range(2))
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))


@pytest.mark.parametrize("scheme", sorted(TOP1))
def test_quantized_bundles_run_the_scale_loop_close_to_fp32(var_bundle, calibrated, scheme):
    result = calibrated[scheme]
    acc = result.manifest.extensions["quantization"]["accuracy"]
    assert acc["data"] == "drawn" and acc["tokens"] == 4 * 66
    assert acc["top1_agreement"] >= TOP1[scheme], acc
    classes = [0, 5]
    got, ref = _greedy(result.output, classes), _greedy(var_bundle, classes)
    equal = np.mean([np.mean(a == b) for a, b in zip(got.tokens, ref.tokens)])
    assert equal >= TOP1[scheme] - 0.1, f"{equal:.0%} of greedy tokens equal fp32's"
    assert got.pixels.shape == ref.pixels.shape
    report = json.loads((result.output / "reports" / "accuracy.json").read_text())
    assert report["data"]["kind"] == "drawn" and report["data"]["images"] == 8
    assert report["worst_layers"], "the per-layer error ran on the step graph"


def test_w8a8_ranges_cover_every_quantized_linear_and_the_step_graph_holds_qdq(var_bundle,
                                                                               calibrated):
    """Every quantized MatMul's input has a range from the step graph's runs (the attention
    output too, which the step graph computes with its own rewritten attention)."""
    out = calibrated["w8a8"].output
    quantized = set(read_manifest(out).extensions["quantization"]["quantized"])
    ranges = json.loads((out / "calibration.json").read_text())["ranges"]
    fp32 = onnx.load(str(var_bundle / "decoder.onnx"), load_external_data=False)
    inputs = {n.input[0] for n in fp32.graph.node if n.name in quantized}
    assert quantized and inputs <= set(ranges), inputs - set(ranges)
    decoder = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    assert all(lo < 0 < hi for lo, hi in ranges.values())  # symmetric, from real activations
    step = onnx.load(str(out / "decoder_step.onnx"), load_external_data=False)
    assert sum(n.op_type == "QuantizeLinear" for n in step.graph.node) == \
        sum(n.op_type == "QuantizeLinear" for n in decoder.graph.node) > 0


def test_a_cached_calibration_gives_the_same_decoder(var_bundle, calibrated, tmp_path):
    first = calibrated["w8a8"].output
    again = calibrate_bundle(bundle=var_bundle, output=tmp_path / "again.arx",
                             options=_options("w8a8", calibration_cache=str(first / "calibration.json")))
    assert (again.output / "decoder.onnx.data").read_bytes() == (first / "decoder.onnx.data").read_bytes()


def test_the_gate_refuses_with_a_measured_remedy_and_writes_nothing(var_bundle, tmp_path):
    out = tmp_path / "refused.arx"
    with pytest.raises(ArxError, match=r"over the 0% gate.*measured") as e:
        calibrate_bundle(bundle=var_bundle, output=out,
                         options=_options("w4", force=False, max_ppl_increase=0.0))
    assert "--smoothquant" not in str(e.value)
    assert not out.exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "arx", "calibrate", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("flags, fragment", [
    (["--random"], "--random does not apply to a next-scale bundle"),
    (["--smoothquant", "0.5"], "--smoothquant does not apply"),
    (["--kv-dtype", "int8"], "--kv-dtype int8 does not apply"),
    (["--data", "{bad_ids}"], "must hold class ids"),
    (["--data", "{big_ids}"], "class ids must be in 0..9"),
])
def test_bad_input_is_one_line_and_writes_nothing(var_bundle, tmp_path, flags, fragment):
    (tmp_path / "bad.txt").write_text("3\nseven\n")
    (tmp_path / "big.txt").write_text("3\n12\n")
    flags = [f.format(bad_ids=tmp_path / "bad.txt", big_ids=tmp_path / "big.txt") for f in flags]
    out = tmp_path / "out.arx"
    assert_one_line(_cli(var_bundle, "-o", out, "-q", *flags), fragment)
    assert not out.exists()


def test_the_cli_draws_32_images_by_default(var_bundle, tmp_path):
    out = tmp_path / "w8.arx"
    proc = _cli(var_bundle, "--scheme", "w8", "--group-size", "16", "-o", out, "-q", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "reports" / "accuracy.json").read_text())
    assert (report["data"]["images"], report["data"]["eval_images"]) == (32, 16)
    assert "image tokens (16 images the fp32 bundle drew" in proc.stdout


@pytest.mark.parametrize("scheme, precision", [("w8a8", "int8"), ("w4", "fp16")])
def test_the_tensorrt_form_of_a_calibrated_bundle_passes_the_engine_check(calibrated, scheme,
                                                                          precision):
    """arx build's form (w8a8: explicit Q/DQ at int8; w4: DequantizeLinear blocks at fp16), run
    by ORT, against the calibrated bundle over the whole scale schedule (builder/var_check.py)."""
    pytest.importorskip("polygraphy")
    import onnxruntime as ort
    from form_runs import form_for
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from arx.builder import check

    bundle = calibrated[scheme].output
    form = form_for(bundle, attention="native", precision=precision, sampler="none",
                    logits="all", max_seq_len=66)
    runner = OnnxrtRunner(ort.InferenceSession(form.proto.SerializeToString(),
                                               providers=["CPUExecutionProvider"]))
    report = check.check_runner(runner, bundle, read_manifest(bundle), form.stage.to_json(),
                                form.spec.s_max, precision)
    assert report["passed"] and report["steps"] == 5, report.get("message")
