"""`arx profile` on a tiny exported Llama: the report's fields and values, compare mode, the plot,
and bad input (one line, exit 2)."""

from __future__ import annotations

import argparse
import json

import pytest

from arx.errors import ArxError

SMALL = ["--prompt-len", "4,12", "--gen-len", "6", "--batch", "1,2", "--runs", "2", "--warmup", "1",
         "--threads", "1", "--quiet"]


def cli(argv: list[str]) -> int:
    """`arx ...` through the real entry point once `profile` is registered there."""
    import arx.cli

    if "profile" in arx.cli.COMMANDS:
        return arx.cli.main(argv)
    from arx.commands import profile

    parser = argparse.ArgumentParser(prog="arx")
    profile.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ArxError as e:
        import sys

        print(f"arx: error: {e}", file=sys.stderr)
        return e.exit_code


@pytest.fixture(scope="module")
def report(exported_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    bundle = exported_bundle("llama")
    rc = cli(["profile", str(bundle), *SMALL, "--json", str(out / "p.json"), "--plot", str(out / "p.png")])
    assert rc == 0
    return json.loads((out / "p.json").read_text()), out


def test_latency_fields_are_sane(report):
    rep, _ = report
    (p,) = rep["bundles"]
    assert {(r["prompt_len"], r["batch"]) for r in p["results"]} == {(4, 1), (12, 1), (4, 2), (12, 2)}
    for r in p["results"]:
        d = r["decode_ms"]
        assert r["ttft_ms"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 10
        assert 0 < d["p50"] <= d["p90"] <= d["p99"]
        assert len(r["runs"]) == 2  # warm-up excluded
        for run in r["runs"]:
            assert run["p50"] <= run["p90"] <= run["p99"]


def test_op_breakdown_names_the_graph_ops(report):
    rep, _ = report
    for r in rep["bundles"][0]["results"]:
        for phase in ("prefill", "decode"):
            ops = {o["op_type"]: o for o in r["op_breakdown"][phase]}
            assert {"MatMul", "GroupQueryAttention"} <= set(ops), (phase, sorted(ops))
            assert sum(o["share"] for o in ops.values()) == pytest.approx(1.0)
            assert all(o["total_ms"] >= 0 and o["calls"] > 0 for o in ops.values())
        # 2 layers: a decode phase of gen_len - 1 = 5 steps runs GQA 2 x 5 times
        gqa = next(o for o in r["op_breakdown"]["decode"] if o["op_type"] == "GroupQueryAttention")
        assert gqa["calls"] == 2 * 5


def test_roofline_fields(report):
    rep, _ = report
    bw = rep["machine"]["memory_bandwidth"]
    assert bw["bytes_per_s"] > 1e8
    for r in rep["bundles"][0]["results"]:
        roof = r["roofline"]
        assert roof["weight_mb"] > 0 and roof["kv_mb"] > 0 and roof["bound_ms"] > 0
        assert 0 < roof["percent_of_roofline"] <= 100 * 1.5  # tiny model: far from the bound
        assert roof["measured_ms"] == r["decode_ms"]["p50"]
    b1, b2 = (next(r for r in rep["bundles"][0]["results"] if (r["prompt_len"], r["batch"]) == k)
              for k in ((12, 1), (12, 2)))
    assert b2["roofline"]["kv_mb"] == pytest.approx(2 * b1["roofline"]["kv_mb"])


def test_plot_is_a_png(report):
    _, out = report
    assert (out / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_two_bundles(exported_bundle, tmp_path, capsys):
    bundle = str(exported_bundle("llama"))
    rc = cli(["profile", bundle, "--compare", bundle, "--prompt-len", "4", "--gen-len", "4",
              "--runs", "1", "--warmup", "0", "--no-roofline", "--no-ops", "--quiet",
              "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")])
    assert rc == 0
    rep = json.loads((tmp_path / "c.json").read_text())
    assert len(rep["bundles"]) == 2
    (c,) = rep["compare"]
    assert c["prompt_len"] == 4 and c["batch"] == 1
    assert c["ttft"] > 0 and c["decode_p50"] > 0 and c["tokens_per_s"] > 0
    assert "compare:" in capsys.readouterr().out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra, words", [
    (["--prompt-len", "0"], "--prompt-len"),
    (["--batch", "2,-1"], "--batch"),
    (["--prompt-len", "a,b"], "--prompt-len"),
    (["--runs", "0"], "--runs"),
    (["--gen-len", "1"], "--gen-len"),
    (["--prompt-len", "250", "--gen-len", "10"], "context"),
])
def test_bad_values_one_line_exit_2(exported_bundle, capsys, extra, words):
    rc = cli(["profile", str(exported_bundle("llama")), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("arx: error:") and words in err and "\n" not in err


def test_unreadable_bundle_exit_2(tmp_path, capsys):
    for bad in (tmp_path / "missing.arx", tmp_path):
        assert cli(["profile", str(bad), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("arx: error:") and "\n" not in err
    (tmp_path / "arx.json").write_text("{not json")
    assert cli(["profile", str(tmp_path), "--quiet"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_bad_compare_bundle_fails_before_timing(exported_bundle, tmp_path, capsys):
    rc = cli(["profile", str(exported_bundle("llama")), "--compare", str(tmp_path / "nope.arx"),
              "--quiet"])
    assert rc == 2 and "nope.arx" in capsys.readouterr().err
