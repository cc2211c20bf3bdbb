"""benchmarks/bench_kv_dtype.py: every path builds, runs in place and times (tiny step count)."""

from __future__ import annotations

from bench_scripts import import_script

bench = import_script("bench_kv_dtype")


def test_emitted_paths_are_the_export_rewrite():
    """fp16/int8 are timed on the graph export/kv_dtype.py emits, not a hand-made one."""
    fp16, _ = bench._model("fp16")
    int8, _ = bench._model("int8")
    gqa16 = [n for n in fp16.graph.node if n.op_type == "GroupQueryAttention"]
    gqa8 = [n for n in int8.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa16) == len(gqa8) == bench.LAYERS
    assert all(n.input[0].startswith("kv/") for n in gqa16)  # q cast to fp16 first
    assert all(n.input[12].endswith(".scale") and n.input[13].endswith(".scale") for n in gqa8)


def test_every_path_times_a_step():
    ms = bench.step_ms(bench.PATHS, past=8, runs=2, threads=1)
    assert set(ms) == set(bench.PATHS) and min(ms.values()) > 0
