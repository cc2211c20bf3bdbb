"""The profiler's pieces without a model: ORT trace aggregation, roofline arithmetic, machine facts."""

from __future__ import annotations

import pytest

from arx.errors import ArxError
from arx.manifest import KVLayout
from arx.runtime.profiler import ProfileOptions, aggregate_ort_trace
from arx.runtime.roofline import Roofline, kv_bytes, memory_bandwidth, peak_rss, reset_peak_rss


def _node(op, ts, dur):
    return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_aggregate_splits_runs_by_label():
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        _node("MatMul", 10, 30), _node("GroupQueryAttention", 50, 10),
        {"cat": "Node", "name": "n1_fence_before", "ts": 9, "dur": 0, "args": {"op_name": "MatMul"}},
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        _node("MatMul", 210, 6), _node("MatMul", 220, 6), _node("Add", 230, 3),
        {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100},
        _node("MatMul", 410, 4),
    ]
    out = aggregate_ort_trace(events, ["prefill", "decode", "decode"])
    pre = {o.op_type: o for o in out["prefill"]}
    assert pre["MatMul"].total_ms == pytest.approx(0.030) and pre["MatMul"].calls == 1
    assert pre["MatMul"].share == pytest.approx(0.75)
    dec = out["decode"]
    assert [o.op_type for o in dec] == ["MatMul", "Add"]  # sorted by time
    assert dec[0].calls == 3 and dec[0].total_ms == pytest.approx(0.016)


def test_aggregate_refuses_a_trace_of_other_runs():
    with pytest.raises(RuntimeError):
        aggregate_ort_trace([{"cat": "Session", "name": "model_run", "ts": 0, "dur": 1}], ["a", "b"])


def test_roofline_arithmetic():
    kv = KVLayout(layers=2, kv_heads=3, head_dim=4, max_seq_len=64)
    assert kv_bytes(kv, batch=2, length=10) == 2 * 2 * 2 * 3 * 10 * 4 * 4
    weights = {"per_step": 1000, "gather_only": {"embed": {"bytes": 800, "row_bytes": 8}}}
    r = Roofline.for_decode(weights, kv, prompt_len=10, gen_len=6, batch=2, bandwidth=1e6)
    assert r.mean_kv_length == 12  # past lengths 10..14 over 5 decode steps
    assert r.weight_bytes == 1000 + 2 * 8
    assert r.bound_ms == pytest.approx((1016 + kv_bytes(kv, 2, 12)) / 1e6 * 1e3)
    j = r.to_json(measured_ms=2 * r.bound_ms)
    assert j["percent_of_roofline"] == pytest.approx(50.0)


def test_machine_measurements():
    bw = memory_bandwidth(threads=1, mib=32, repeats=3)
    assert bw["bytes_per_s"] > 1e8 and bw["threads"] == 1
    reset_peak_rss()
    assert peak_rss() > 1e6


@pytest.mark.parametrize("kw", [dict(prompt_lens=()), dict(prompt_lens=(0,)), dict(batches=(-1,)),
                                dict(gen_len=1), dict(runs=0), dict(warmup=-1), dict(threads=-2)])
def test_options_reject_bad_values(kw):
    with pytest.raises(ArxError):
        ProfileOptions(**kw)
