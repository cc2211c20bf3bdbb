"""Bad input and the accuracy gate: one clear line, exit 2, nothing written (unless --force)."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import onnx
import pytest

from arx.commands import calibrate as calibrate_cmd
from arx.errors import ArxError


def cli(argv: list[str]) -> tuple[int, str]:
    """What `arx calibrate ...` does (arx.cli registers the same module): exit code, stderr line."""
    parser = argparse.ArgumentParser(prog="arx")
    calibrate_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["calibrate", *argv])
    try:
        return int(args.run(args) or 0), ""
    except ArxError as e:
        return e.exit_code, str(e)


def assert_refused(tmp_path, argv, *words):
    out = tmp_path / "out.arx"
    code, message = cli([*argv, "-o", str(out), "-q", "--no-plot"])
    assert code == 2 and "\n" not in message, message
    for w in words:
        assert w in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.arx")]  # no temp left


def test_empty_data_file(llama_bundle, tmp_path):
    data = tmp_path / "empty.txt"
    data.write_text("\n  \n\n")
    assert_refused(tmp_path, [str(llama_bundle), "--data", str(data)], "has no text")


def test_missing_and_unreadable_data(llama_bundle, tmp_path):
    assert_refused(tmp_path, [str(llama_bundle), "--data", str(tmp_path / "nope.txt")], "does not exist")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    assert_refused(tmp_path, [str(llama_bundle), "--data", str(binary)], "cannot read")
    assert_refused(tmp_path, [str(llama_bundle)], "--data")  # no data at all


def test_jsonl_without_the_text_field(llama_bundle, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"content": "hello there"}) + "\n")
    assert_refused(tmp_path, [str(llama_bundle), "--data", str(data)], "--text-field")


def test_too_few_samples_for_the_method(llama_bundle, calib_text, tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("".join(calib_text.read_text().splitlines(keepends=True)[:10]))
    assert_refused(tmp_path, [str(llama_bundle), "--data", str(few), "--method", "entropy"],
                   "needs at least 16")


def test_unknown_scheme_and_bad_options(llama_bundle, calib_text, tmp_path):
    base = [str(llama_bundle), "--data", str(calib_text)]
    assert_refused(tmp_path, [*base, "--scheme", "w3"], "unknown scheme", "w8a8")
    assert_refused(tmp_path, [*base, "--scheme", "w4", "--group-size", "48"], "one of 16, 32, 64, 128, 256")
    assert_refused(tmp_path, [*base, "--method", "mse"], "unknown calibration method")
    assert_refused(tmp_path, [*base, "--keep-fp", "layers.9"], "matches no MatMul")


@pytest.mark.parametrize("scheme", ["w4", "w8"])
def test_group_size_beyond_what_onnxruntime_quantizes(llama_bundle, calib_text, tmp_path, scheme):
    # a power of two, but MLAS quantizes blocks of at most 256 (it used to fail inside onnxruntime)
    assert_refused(tmp_path, [str(llama_bundle), "--data", str(calib_text), "--scheme", scheme,
                              "--group-size", "512"], "--group-size", "256")


def test_already_quantized_bundle(llama_bundle, calib_text, tmp_path):
    q = tmp_path / "q.arx"
    shutil.copytree(llama_bundle, q)
    manifest = json.loads((q / "arx.json").read_text())
    manifest["quantization"] = {"scheme": "w8"}
    (q / "arx.json").write_text(json.dumps(manifest))
    assert_refused(tmp_path, [str(q), "--data", str(calib_text)], "already quantized")


@pytest.fixture
def bad_accuracy(monkeypatch):
    """Make the evaluation report a 50 % perplexity increase, whatever the model does."""
    from arx.calibration import evaluate

    real = evaluate.model_metrics

    def worse(*args, **kwargs):
        m = real(*args, **kwargs)
        m.ppl_quant = m.ppl_fp32 * 1.5
        return m

    monkeypatch.setattr(evaluate, "model_metrics", worse)


def test_gate_refuses_and_names_worst_layers(llama_bundle, calib_text, tmp_path, bad_accuracy):
    out = tmp_path / "g.arx"
    code, message = cli([str(llama_bundle), "--data", str(calib_text), "--scheme", "w8", "-o", str(out),
                         "-q", "--no-plot", "--group-size", "32"])
    assert code == 2 and "by 50.00%" in message and "layers." in message and "--keep-fp" in message
    assert "nothing was written" in message and not out.exists()


def test_gate_force_writes_and_records_failure(llama_bundle, calib_text, tmp_path, bad_accuracy, capsys):
    out = tmp_path / "g.arx"
    code, _ = cli([str(llama_bundle), "--data", str(calib_text), "--scheme", "w8", "-o", str(out),
                   "-q", "--no-plot", "--force", "--group-size", "32"])
    assert code == 0 and out.is_dir()
    acc = json.loads((out / "arx.json").read_text())["quantization"]["accuracy"]
    assert acc["passed"] is False and acc["forced"] is True
    assert "FAIL" in capsys.readouterr().out


def test_gate_threshold_flag(llama_bundle, calib_text, tmp_path, bad_accuracy):
    out = tmp_path / "g.arx"
    code, _ = cli([str(llama_bundle), "--data", str(calib_text), "--scheme", "w8", "-o", str(out),
                   "-q", "--no-plot", "--max-ppl-increase", "60%", "--group-size", "32"])
    assert code == 0 and out.is_dir()


def test_small_gate_prints_with_its_precision(llama_bundle, calib_text, tmp_path, bad_accuracy, capsys):
    base = [str(llama_bundle), "--data", str(calib_text), "--scheme", "w8", "-q", "--no-plot", "--group-size", "32"]
    code, message = cli([*base, "-o", str(tmp_path / "a.arx"), "--max-ppl-increase", "0.5"])
    assert code == 2 and "over the 0.5% gate" in message, message  # was "over the 0% gate"
    code, _ = cli([*base, "-o", str(tmp_path / "b.arx"), "--max-ppl-increase", "0.25%", "--force"])
    assert code == 0 and "(gate 0.25%: FAIL)" in capsys.readouterr().out


def test_random_tokens_are_marked(llama_bundle, tmp_path):
    out = tmp_path / "r.arx"
    code, _ = cli([str(llama_bundle), "--random", "--samples", "4", "--seq-len", "16", "--eval-samples", "2",
                   "--scheme", "w8", "--group-size", "32", "-o", str(out), "-q", "--no-plot", "--force"])
    report = json.loads((out / "reports" / "accuracy.json").read_text())
    assert code == 0 and report["data"]["kind"] == "random token ids"


def test_seq_len_longer_than_the_context(llama_bundle, calib_text, tmp_path):
    from arx.manifest import read_manifest

    context = read_manifest(llama_bundle).kv.max_seq_len
    assert_refused(tmp_path, [str(llama_bundle), "--data", str(calib_text), "--seq-len",
                              str(context + 1)], "exceeds the bundle's context")


# Weight-only activations stay float by default, and a refusal's remedies are measured
# (arx.calibration.remedies). The model: a tiny Llama trained for a few seconds on the fixture
# text (a random model's perplexity is near the vocabulary size whatever quantization does),
# then given an activation outlier: channel 3 of every norm's output is 1000x the rest and no
# linear reads it (its weight rows are zero), like the massive activations of large LLMs. Float
# weight error does not see it, but an int8 block of activations holding channel 3 rounds its
# other values to zero.
OUTLIER_CHANNEL, OUTLIER = 3, 1000.0


def _train(model, tokenizer, text: str, steps: int = 60) -> None:
    import torch

    enc = [tokenizer(line)["input_ids"][:32] for line in text.splitlines()]
    n = min(len(e) for e in enc)
    batch = torch.tensor([e[:n] for e in enc])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _add_outlier(model) -> None:
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[OUTLIER_CHANNEL] = OUTLIER
            layer.post_attention_layernorm.weight[OUTLIER_CHANNEL] = OUTLIER
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight[:, OUTLIER_CHANNEL] = 0  # (out, in): nothing reads the outlier


@pytest.fixture(scope="module")
def outlier_bundle(tmp_path_factory, calib_text):
    import torch
    import transformers as tf

    from arx.export.exporter import ExportOptions, export_model
    from tokenizer_fixtures import make_llama

    src = tmp_path_factory.mktemp("hf-outlier")
    make_llama(src)
    tokenizer = tf.AutoTokenizer.from_pretrained(src)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _train(model, tokenizer, calib_text.read_text())
    _add_outlier(model)
    model.save_pretrained(src)
    out = tmp_path_factory.mktemp("outlier-bundle") / "outlier.arx"
    export_model(source=src, output=out, options=ExportOptions(progress=False))
    return out


def _run(bundle, data, out, *flags):
    return cli([str(bundle), "--data", str(data), "--samples", "24", "--seq-len", "32", "--eval-samples", "8",
                "--group-size", "32", "-o", str(out), "-q", "--no-plot", *flags])


def _increase(bundle) -> float:
    return json.loads((bundle / "arx.json").read_text())["quantization"]["accuracy"]["ppl_increase"]


def _levels(bundle) -> set[int]:
    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    return {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"}


def test_w4_int8_activations_fail_and_the_measured_remedy_holds(outlier_bundle, calib_text, tmp_path):
    code, message = _run(outlier_bundle, calib_text, tmp_path / "l4.arx", "--scheme", "w4")  # level 4
    assert code == 2 and "\n" not in message and not (tmp_path / "l4.arx").exists(), message
    assert float(re.search(r"raises perplexity by ([\d.]+)%", message).group(1)) > 100  # the outlier blocks
    # the remedy the numbers point to comes first, with what it was measured to give
    first = re.search(r"try (--\S+ \S+) \(measured ([+-][\d.]+)%, passes\)", message)
    assert first and first.group(1) == "--accuracy-level 1", message
    # following the remedy passes with exactly the measured increase
    code, again = _run(outlier_bundle, calib_text, tmp_path / "w4.arx", "--scheme", "w4",
                       "--accuracy-level", "1")
    assert code == 0 and _levels(tmp_path / "w4.arx") == {1}, (message, again)
    assert f"{_increase(tmp_path / 'w4.arx'):+.2%}" == first.group(2) + "%"


def test_w8a8_refusal_measures_keeping_the_worst_layers(outlier_bundle, calib_text, tmp_path):
    # per-tensor int8 activations cannot hold the outlier either; --keep-fp is re-quantized from
    # the same ranges and evaluated, and a rerun with it gives the measured number
    code, message = _run(outlier_bundle, calib_text, tmp_path / "a.arx", "--scheme", "w8a8")
    keep = re.search(r"(--keep-fp \S+) \(measured ([+-][\d.]+)%", message)
    assert code == 2 and keep and "--smoothquant 0.5" in message, message
    code, _ = _run(outlier_bundle, calib_text, tmp_path / "b.arx", "--scheme", "w8a8", *keep.group(1).split(),
                   "--force")
    assert code == 0 and f"{_increase(tmp_path / 'b.arx'):+.2%}" == keep.group(2) + "%"
