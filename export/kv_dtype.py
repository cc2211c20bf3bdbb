"""A smaller KV cache: rewrite a bundle's attention to read and write an fp16 or int8 cache.

What ONNX Runtime 1.31's CPU GroupQueryAttention does with a non-fp32 cache (measured,
benchmarks/bench_kv_dtype.py; docs/design.md, "KV cache dtype"):
    T=float, cache float16  runs, but several times slower than fp32 at every length (the
                            mixed-type path converts the cache it reads): not used
    T=float16, cache float16  q/k/v and the RoPE tables cast to fp16 (only the new tokens are
                            cast per step; ORT folds the table casts at load), output cast back
    T=float, cache int8     GQA's own quantized cache: k_scale/v_scale inputs, k/v_quant_type
                            PER_TENSOR or PER_CHANNEL, kv_cache_bit_width 8; it quantizes what it
                            writes (round half to even, saturating to [-128, 127]) and reads the
                            int8 cache inside the op, no cast of the whole cache

int8 scales are static, symmetric, one per layer, kv head and head channel (PER_CHANNEL, shape
(kv_heads, 1, head_dim)): 1.25 x absmax / 127 of each channel's keys (after RoPE) and
values over calibration text (HEADROOM). Per channel, not per tensor, because a few RoPE'd key channels carry most of
the magnitude; per token block would need scales computed as the cache is written, which the
fused op does not take, and a path of our own around it would cast or re-read the cache.

The general-step graph (TensorScatter + Attention) gets the same cache: the new block is
encoded before TensorScatter writes it (Cast, or Div/Round/Clip/Cast, the op's own rounding),
and Attention reads the decoded cache (Cast, or Cast * scale): a whole-cache decode, which that
graph (multi-token steps after a past) can afford and the decode path never does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto
from onnx_ir.passes.common import TopologicalSortPass

from arx.errors import ArxError
from arx.export.graph_ir import Editor, edit_proto, take_place
from arx.manifest import KVLayout, Manifest, TensorSpec

KV_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}  # flag -> manifest dtype
SCALES = "per_channel"
EXTENSION = "kv_cache"  # manifest section: the cache dtype and where its scales came from
RANDOM_SAMPLES, RANDOM_TOKENS = 16, 128  # export's int8 scales (no text there)
# int8 scales cover 1.25x the calibration maximum: text the calibration never saw goes past
# it, and clipping costs more than the lost resolution (models/arx-tiny, held-out text, KL vs
# the fp32 cache: 0.8x 8.7e-5, 1x 4.5e-6, 1.25x 2.0e-6)
HEADROOM = 1.25
_GQA = ("com.microsoft", "GroupQueryAttention")
_ONNX = {"float16": TensorProto.FLOAT16, "int8": TensorProto.INT8, "float32": TensorProto.FLOAT}
_SCALE_INPUTS = 12  # GroupQueryAttention's k_scale, v_scale are inputs 12 and 13
_QUANT_ATTRS = ("k_quant_type", "v_quant_type", "kv_cache_bit_width")


def manifest_dtype(flag: str) -> str:
    if flag not in KV_DTYPES:
        raise ArxError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)}, not {flag!r}")
    return KV_DTYPES[flag]


def scale_name(past: str) -> str:
    return f"{past}.scale"


def retype_layout(kv: KVLayout, dtype: str) -> KVLayout:
    return dataclasses.replace(kv, dtype=dtype, scales=SCALES if dtype == "int8" else "none")


def retype_decoder(model: onnx.ModelProto, kv: KVLayout, dtype: str,
                   scales: dict[str, np.ndarray] | None = None) -> None:
    """Rewrite every GroupQueryAttention node of an fp32-cache decoder for a `dtype` cache."""
    edit_proto(model, lambda m: _retype_decoder(m, kv, dtype, scales))


def _retype_decoder(model: ir.Model, kv: KVLayout, dtype: str,
                    scales: dict[str, np.ndarray] | None) -> None:
    graph = model.graph
    ed = Editor(graph, prefix="kv")
    casts: dict[str, ir.Value] = {}  # fp32 value -> its fp16 cast (the RoPE tables are shared)

    def half(value: ir.Value) -> ir.Value:
        if value.name not in casts:
            casts[value.name] = ed.op("Cast", value, to=TensorProto.FLOAT16, name="kv/fp16")
        return casts[value.name]

    for n in [n for n in graph if (n.domain, n.op_type) == _GQA]:
        if dtype == "float16":
            for j in (0, 1, 2, 7, 8):  # q, k, v (new tokens only), cos, sin
                if j < len(n.inputs) and n.inputs[j] is not None:
                    n.replace_input_with(j, half(n.inputs[j]))
            ed.insert_after(n.outputs[0], "Cast", name=f"{n.name}/out_fp32",
                            rename=f"{n.name}/out_fp16", to=TensorProto.FLOAT)
        else:
            names = [_scale(ed, scales, n.inputs[3].name), _scale(ed, scales, n.inputs[4].name)]
            n.resize_inputs(_SCALE_INPUTS + 2)  # missing optional inputs in between stay empty
            for j, value in enumerate(names, _SCALE_INPUTS):
                n.replace_input_with(j, value)
            n.attributes.update({a.name: a for a in (
                ir.convenience.convert_attribute(_QUANT_ATTRS[0], "PER_CHANNEL"),
                ir.convenience.convert_attribute(_QUANT_ATTRS[1], "PER_CHANNEL"),
                ir.convenience.convert_attribute(_QUANT_ATTRS[2], 8))})
    _retype_io(graph, kv, dtype)
    TopologicalSortPass()(model)


def restore_decoder(model: ir.Model, kv: KVLayout) -> dict[str, np.ndarray] | None:
    """Undo retype_decoder on a loaded decoder (the TensorRT forms rewrite the fp32-cache
    GroupQueryAttention, then give their own cache ops the dtype); return the int8 scales per
    past name (None for an fp16 or fp32 cache)."""
    graph = model.graph
    scales: dict[str, np.ndarray] = {}
    dead: dict[str, ir.Node] = {}
    for n in [n for n in graph if (n.domain, n.op_type) == _GQA]:
        for j, value in enumerate(n.inputs):  # q/k/v/cos/sin through "kv/fp16" casts
            made = value.producer() if value is not None else None
            if made is not None and made.name.startswith("kv/") and made.op_type == "Cast":
                n.replace_input_with(j, made.inputs[0])
                dead[made.name] = made
        if len(n.inputs) > _SCALE_INPUTS:
            for past, scale in zip(n.inputs[3:5], n.inputs[_SCALE_INPUTS:]):
                scales[past.name] = scale.const_value.numpy()
            kept = list(n.inputs[:_SCALE_INPUTS])
            while kept and kept[-1] is None:
                kept.pop()
            n.resize_inputs(len(kept))
            for name in _QUANT_ATTRS:
                n.attributes.pop(name, None)
        back = [u.node for u in n.outputs[0].uses() if u.node.name.startswith("kv/")]
        if back:  # the fp16 output's Cast back to fp32 goes with the node's fp16
            take_place(back[0].outputs[0], n.outputs[0])  # the Cast's readers read the node
            dead[back[0].name] = back[0]
    graph.remove(list(dead.values()), safe=True)
    for name in {scale_name(p) for p in scales}:
        if name in graph.initializers and not graph.initializers[name].uses():
            del graph.initializers[name]
    _retype_io(graph, kv, "float32")
    return scales or None




def retype_step_graph(model: onnx.ModelProto, kv: KVLayout, dtype: str,
                      scales: dict[str, np.ndarray] | None = None) -> None:
    """retype_step_ir on a ModelProto (a saved bundle's step graph), rewritten in place."""
    edit_proto(model, lambda m: retype_step_ir(m, kv, dtype, scales))


def retype_step_ir(model: ir.Model, kv: KVLayout, dtype: str,
                   scales: dict[str, np.ndarray] | None = None) -> None:
    """Encode each TensorScatter's new block into the cache dtype; decode what Attention reads."""
    graph = model.graph
    ed = Editor(graph, prefix="kv")
    pasts = {past for past, _ in kv.pairs()}
    for n in [n for n in graph if n.op_type == "TensorScatter" and n.inputs[0].name in pasts]:
        scale = _scale(ed, scales, n.inputs[0].name) if dtype == "int8" else None
        n.replace_input_with(1, _encode(ed, n.inputs[1], dtype, scale))
        present = n.outputs[0]
        readers = list(present.uses())  # the present output itself stays the encoded cache
        ed.feed(readers, _decode(ed, present, dtype, scale))
    _retype_io(graph, kv, dtype)
    TopologicalSortPass()(model)


def _encode(ed: Editor, x: ir.Value, dtype: str, scale: ir.Value | None) -> ir.Value:
    if dtype == "float16":
        return ed.op("Cast", x, to=TensorProto.FLOAT16, name="kv/encode")
    q = ed.op("Round", ed.op("Div", x, scale, name="kv/quantize"))  # Round: half to even, as GQA
    q = ed.op("Clip", q, ed.const(-128.0, np.float32), ed.const(127.0, np.float32))
    return ed.op("Cast", q, to=TensorProto.INT8, name="kv/encode")


def _decode(ed: Editor, x: ir.Value, dtype: str, scale: ir.Value | None) -> ir.Value:
    y = ed.op("Cast", x, to=TensorProto.FLOAT, name="kv/decode")
    return ed.op("Mul", y, scale, name="kv/dequantize") if dtype == "int8" else y


def _scale(ed: Editor, scales: dict[str, np.ndarray] | None, past: str) -> ir.Value:
    name = scale_name(past)
    if name not in ed.graph.initializers:
        if scales is None or past not in scales:
            raise ArxError(f"an int8 cache needs a scale for {past}; calibrate the cache scales "
                           f"(arx calibrate --kv-dtype int8 --data FILE)")
        ed.initializer(name, np.ascontiguousarray(scales[past], dtype=np.float32))
    return ed.graph.initializers[name]


def _retype_io(graph: ir.Graph, kv: KVLayout, dtype: str) -> None:
    names = {name for pair in kv.pairs() for name in pair}
    for value in (*graph.inputs, *graph.outputs):
        if value.name in names:
            value.dtype = ir.DataType(_ONNX[dtype])


def measure_scales(bundle: Path, samples: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per past name, (kv_heads, 1, head_dim) float32: HEADROOM x absmax / 127 of the fp32
    cache each sample leaves after a prefill (keys after RoPE, as the op quantizes them)."""
    from arx.runtime.decoder import DecoderSession

    if not samples:
        raise ArxError("an int8 cache needs calibration text for its scales; give --data")
    with DecoderSession(bundle) as s:
        peak = {past: np.zeros((s.kv.kv_heads, s.kv.head_dim), np.float32)
                for past, _ in s.kv.pairs()}
        for ids in samples:
            ids = np.asarray(ids, np.int64)[None]
            cache = s.new_cache(1, ids.shape[1])
            s.step(cache, ids, np.array([ids.shape[1]]), logits="none")
            for past in peak:
                values = np.abs(cache.buffers[past].numpy()[0, :, :ids.shape[1]])  # (Hkv, S, D)
                peak[past] = np.maximum(peak[past], values.max(axis=1))
            cache.close()
    # a channel that stayed 0 still gets a usable step (its values quantize to 0 or saturate)
    return {k: (np.maximum(v, 1e-6) * HEADROOM / 127.0)[:, None, :].astype(np.float32)
            for k, v in peak.items()}


def convert_bundle(bundle: Path, manifest: Manifest, dtype: str,
                   scales: dict[str, np.ndarray] | None = None) -> Manifest:
    """Rewrite an fp32-cache bundle's decoder (and general-step graph) in place for a `dtype`
    cache; return the manifest with the new KV layout (the caller writes it)."""
    from arx.export.step_graph import EXTENSION, STEP_STAGE, weights_fingerprint

    kv = manifest.kv
    if dtype == kv.dtype:
        return manifest
    if kv.dtype != "float32" or kv.update != "in_place":
        raise ArxError(f"the {kv.dtype} {kv.update} cache of {bundle} cannot be converted; start "
                       f"from an fp32 export with the in-place cache")
    decoder = Path(bundle) / manifest.decoder.file
    model = onnx.load(str(decoder), load_external_data=False)
    if not any((n.domain, n.op_type) == _GQA for n in model.graph.node):
        raise ArxError(f"{bundle}'s decoder has no GroupQueryAttention node to give a {dtype} "
                       f"cache (a custom-protocol export?); export it without --kv-dtype")
    retype_decoder(model, kv, dtype, scales)
    onnx.save_model(model, str(decoder))  # the weights' references into .data are unchanged
    step = manifest.stages.get(STEP_STAGE)
    if step is not None:
        path = Path(bundle) / step.file
        step_model = onnx.load(str(path), load_external_data=False)
        retype_step_graph(step_model, kv, dtype, scales)
        onnx.save_model(step_model, str(path))
        manifest.extensions[EXTENSION] = {**manifest.extensions[EXTENSION],
                                          "sha256": weights_fingerprint(decoder)}
    new_kv = retype_layout(kv, dtype)
    cache_names = {name for pair in kv.pairs() for name in pair}

    def spec(t: TensorSpec) -> TensorSpec:
        return dataclasses.replace(t, dtype=dtype) if t.name in cache_names else t

    manifest.stages = {
        name: dataclasses.replace(st, kv=new_kv, inputs=tuple(map(spec, st.inputs)),
                                  outputs=tuple(map(spec, st.outputs))) if st.kv == kv else st
        for name, st in manifest.stages.items()}
    return manifest


def record(manifest: Manifest, scales_from: dict | None) -> Manifest:
    """The manifest section saying what the cache is and where its int8 scales came from."""
    kv = manifest.kv
    manifest.extensions[EXTENSION] = {"dtype": kv.dtype, "scales": kv.scales,
                                      **({"scales_from": scales_from} if scales_from else {})}
    return manifest


def convert_export(bundle: Path, manifest: Manifest, flag: str, seed: int = 0) -> Manifest:
    """`arx export --kv-dtype`: int8 scales from seeded random token ids (export has no text;
    `arx calibrate --kv-dtype int8 --data` measures them on text and gates the result)."""
    dtype = manifest_dtype(flag)
    if dtype == "int8":
        rng = np.random.default_rng(seed)
        n = min(RANDOM_TOKENS, manifest.kv.max_seq_len)
        samples = [rng.integers(0, manifest.vocab_size, n) for _ in range(RANDOM_SAMPLES)]
        source = {"kind": "random", "samples": RANDOM_SAMPLES, "tokens": n, "seed": seed}
        return record(convert_bundle(bundle, manifest, dtype, measure_scales(bundle, samples)),
                      source)
    return record(convert_bundle(bundle, manifest, dtype), None)
