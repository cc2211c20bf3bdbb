"""Attention step time with an fp32, fp16 or int8 KV cache on ONNX Runtime CPU (the choice
behind export/kv_dtype.py and docs/design.md, "KV cache dtype").

Per path, the decode step (batch 1, one new token) of 12 GroupQueryAttention layers of the 125M
benchmark shape (12 heads, 12 kv heads, head 64, cache 2048), the cache bound in place as the
runtime binds it, at past lengths 128/1024/1900:

    fp32            the fp32 cache (today's bundles)
    fp16            what --kv-dtype fp16 emits: q/k/v cast to fp16 around GQA(T=float16)
    fp16-mixed      GQA(T=float, cache float16), the op's mixed-type path (not used)
    int8            what --kv-dtype int8 emits: GQA's own int8 cache, PER_CHANNEL scales
    int8-cast       the baseline: DequantizeLinear of the whole cache, then fp32 GQA

    .venv/bin/python benchmarks/bench_kv_dtype.py [--pasts 128 1024 1900] [--runs 50]

Prints the 10th percentile of the step times in ms (a shared machine's noise is one-sided),
the paths interleaved run by run.
Decode tokens/s of whole models per cache dtype: benchmarks/bench_decode.py on bundles made
with arx export/calibrate --kv-dtype (--variants w4,w4-kv16,w4-kv8), beside llama.cpp q4_0 with
its f16 and q8_0 caches (llama_cpp_engine.py) in the same run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as h

from arx.export.kv_dtype import retype_decoder
from arx.manifest import KVLayout

HEADS, KV_HEADS, D, S_MAX, LAYERS = 12, 12, 64, 2048, 12
PATHS = ("fp32", "fp16", "fp16-mixed", "int8", "int8-cast")


def _model(path: str):
    kv = KVLayout(LAYERS, KV_HEADS, D, S_MAX)
    cache = {"fp16-mixed": TP.FLOAT16, "int8-cast": TP.INT8}.get(path, TP.FLOAT)
    ins = [h.make_tensor_value_info(n, TP.FLOAT, ["B", "S", w * D])
           for n, w in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS))]
    ins += [h.make_tensor_value_info("seqlens_k", TP.INT32, ["B"]),
            h.make_tensor_value_info("total", TP.INT32, [])]
    nodes, outs, inits = [], [], []
    for i in range(LAYERS):
        past, present = [kv.past_key.format(i=i), kv.past_value.format(i=i)], \
            [kv.present_key.format(i=i), kv.present_value.format(i=i)]
        ins += [h.make_tensor_value_info(p, cache, ["B", KV_HEADS, S_MAX, D]) for p in past]
        read = past
        if path == "int8-cast":  # the whole cache dequantized every step
            inits.append(h.make_tensor(f"s{i}", TP.FLOAT, [], [0.03]))
            read = [f"dq{i}.{j}" for j in range(2)]
            nodes += [h.make_node("DequantizeLinear", [p, f"s{i}"], [r]) for p, r in zip(past, read)]
        nodes.append(h.make_node("GroupQueryAttention", ["q", "k", "v", *read, "seqlens_k", "total"],
                                 [f"out{i}", *present], domain="com.microsoft",
                                 num_heads=HEADS, kv_num_heads=KV_HEADS, name=f"gqa{i}"))
        outs += [h.make_tensor_value_info(f"out{i}", TP.FLOAT, None)]
        outs += [h.make_tensor_value_info(p, TP.FLOAT if path == "int8-cast" else cache, None)
                 for p in present]
    m = h.make_model(h.make_graph(nodes, "attention", ins, outs, inits),
                     opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    if path in ("fp16", "int8"):
        scales = {p: np.full((KV_HEADS, 1, D), 0.03, np.float32) for p, _ in kv.pairs()}
        retype_decoder(m, kv, {"fp16": "float16", "int8": "int8"}[path], scales)
    return m, kv


def _bound(path: str, past: int, threads: int):
    """(session, io binding, the buffers it holds) for one path's decode step after `past`."""
    model, kv = _model(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    io, rng = sess.io_binding(), np.random.default_rng(0)
    for name, width in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
        io.bind_cpu_input(name, rng.standard_normal((1, 1, width * D)).astype(np.float32))
    io.bind_cpu_input("seqlens_k", np.array([past], np.int32))
    io.bind_cpu_input("total", np.array(past + 1, np.int32))
    dtype = {"fp16": np.float16, "fp16-mixed": np.float16, "int8": np.int8,
             "int8-cast": np.int8}.get(path, np.float32)
    held = []
    for past_name, present in kv.pairs():
        value = ort.OrtValue.ortvalue_from_numpy(
            np.clip(rng.standard_normal((1, KV_HEADS, S_MAX, D)) * 20, -127, 127).astype(dtype))
        held.append(value)
        io.bind_ortvalue_input(past_name, value)
        if path == "int8-cast":
            io.bind_output(present)  # an fp32 copy: the int8 write would be another pass
        else:
            io.bind_ortvalue_output(present, value)  # in place, as runtime/kv_cache.py binds
    for i in range(LAYERS):
        io.bind_output(f"out{i}")
    for _ in range(3):
        sess.run_with_iobinding(io)
    return sess, io, held


def step_ms(paths, past: int, runs: int, threads: int) -> dict[str, float]:
    """10th percentile of each path's step time in ms, the paths interleaved run by run (so a
    shared machine's changing load hits each the same)."""
    bound = {path: _bound(path, past, threads) for path in paths}
    times: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(runs):
        for path, (sess, io, _) in bound.items():
            t = time.perf_counter()
            sess.run_with_iobinding(io)
            times[path].append(time.perf_counter() - t)
    return {path: float(np.percentile(t, 10)) * 1e3 for path, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pasts", type=int, nargs="+", default=[128, 1024, 1900])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    a = p.parse_args()
    print(f"attention step, {LAYERS} layers, ms (p10 of {a.runs}, {a.threads} threads)")
    print(f"{'past':>6}" + "".join(f"{x:>12}" for x in a.paths))
    for past in a.pasts:
        ms = step_ms(a.paths, past, a.runs, a.threads)
        print(f"{past:>6}" + "".join(f"{ms[x]:>12.2f}" for x in a.paths), flush=True)


if __name__ == "__main__":
    main()
