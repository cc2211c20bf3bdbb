"""Hugging Face causal LMs -> decoder.onnx through the family registry and graph builder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from arx.errors import ArxError
from arx.export.decoder_graph import build_decoder
from arx.export.embedder import EMBEDDER_STAGE, build_embedder, save_embedder
from arx.export.exporter import DecoderExport, ExportOptions, resolve_max_seq_len
from arx.export.families import DecoderConfig
from arx.export.moe_graph import moe_form
from arx.export.external_data import ExternalDataWriter
from arx.export.rotary_layout import reorder_layer, widen_tables
from arx.export.sources import LoadedSource
from arx.export.step_graph import EXTENSION, STEP_STAGE, build_step_graph, save_step_graph
from arx.export.tensor_source import StateDictSource
from arx.export.weights import read_weights
from arx.manifest import KVLayout, Pipeline
from arx.progress import bar

DECODER_FILE = "decoder.onnx"


def export_hf_decoder(src: LoadedSource, bundle: Path, options: ExportOptions,
                      head: Callable | None = None) -> DecoderExport:
    """`head(g, rows)`, if given, writes `logits` from the final-norm rows (B, K, H) in place of
    the LM head (Janus' image generation head, export/janus.py)."""
    family = src.family
    cfg = family.read_config(src.module.config)
    cfg = dataclasses.replace(cfg, moe_form=moe_form(cfg, options.moe))  # in model_info.config
    if cfg.head_dim % 16:
        raise ArxError(f"head_dim {cfg.head_dim} is not a multiple of 16, which onnxruntime's fused "
                       f"attention (GroupQueryAttention) requires; arx cannot export this model yet")
    max_seq_len = resolve_max_seq_len(options, cfg.max_position_embeddings)
    quantizer = None
    if options.quantize is not None:  # each linear quantized as it is emitted
        from arx.export.quantized_export import EmitQuantizer, check_moe

        check_moe(cfg)
        quantizer = EmitQuantizer(options.quantize.quant)
    # src.tensors: the safetensors files read tensor by tensor (or a loaded state dict);
    # partial rotary widths GQA refuses (export/rotary_layout.py) reordered per layer as read
    tensors = src.tensors if src.tensors is not None else StateDictSource(src.module.state_dict())
    weights = read_weights(cfg, family.weights, tensors, lambda lw: reorder_layer(lw, cfg))
    # one bar tick per layer read, converted and written: tqdm shows the time left
    weights.layers = bar(weights.layers, "layers", total=cfg.num_layers, enabled=options.progress)
    kv = KVLayout(layers=cfg.num_layers, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                  max_seq_len=max_seq_len, dtype=options.dtype)
    rope = None
    if cfg.positions == "rope":
        rope = widen_tables(rope_cache(src.module, cfg, max_seq_len), cfg)
    token_input = "inputs_embeds" if options.inputs_embeds else "input_ids"
    # each weight goes to decoder.onnx.data as it is emitted (export/external_data.py)
    with ExternalDataWriter(bundle / (DECODER_FILE + ".data"), DECODER_FILE + ".data") as data:
        model, stage = build_decoder(cfg, weights, kv, rope, DECODER_FILE, token_input, head,
                                     writer=data, dtype=options.dtype, quantizer=quantizer)
    onnx.save_model(model, str(bundle / DECODER_FILE))
    # `model`'s tensors point into decoder.onnx.data: the step graph shares them
    step_model, step_stage = build_step_graph(model, stage, kv)
    step_ext = save_step_graph(step_model, step_stage, bundle, stage)
    n_params = int(sum(p.numel() for p in src.module.parameters()))  # tied weights once
    info = {"source_format": "huggingface", "architecture": type(src.module).__name__,
            "parameters": n_params, "dtype": options.dtype, "config": cfg.__dict__}
    out = DecoderExport(cfg.family, cfg.vocab_size, kv, stage, info, family.atol,
                        extra_stages={STEP_STAGE: step_stage}, extensions={EXTENSION: step_ext})
    if quantizer is not None:  # export/quantized_export.finish completes the section
        out.extensions["quantization"] = quantizer.section()
    if options.inputs_embeds:
        embed_model, embed_stage, shared = build_embedder(weights.embed, model)
        save_embedder(embed_model, embed_stage, bundle, shared)
        out.plain_stages = {EMBEDDER_STAGE: embed_stage}
        out.pipeline = Pipeline(feedback="inputs_embeds", embed=EMBEDDER_STAGE)
    return out


def rope_cache(model, cfg: DecoderConfig, max_seq_len: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cos/sin tables (max_seq_len, rotary_dim/2) from the model's own rotary embedding, so
    every scaling variant (linear, dynamic, llama3, yarn, longrope) matches Hugging Face; one
    per table the layers use ("default", or a layer type: Gemma 3's local and global bases)."""
    import torch

    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is None:
        raise ArxError(f"{type(model).__name__} has no rotary_emb module, so arx cannot read its "
                       f"RoPE tables; this checkpoint's modelling code differs from the family's "
                       f"(check transformers' version) - please report the model")
    if any(b.is_meta for b in rotary.buffers()):  # a config-only model: build just the rotary
        rotary = type(rotary)(getattr(rotary, "config", None) or model.config)
    pos = torch.arange(max_seq_len)[None, :]
    half = cfg.rotary_dim // 2
    tables = {}
    for name in sorted({cfg.rope_table(i) for i in range(cfg.num_layers)} - {""}):
        args = () if name == "default" else (name,)  # Gemma 3: rotary_emb(x, pos, layer_type)
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos, *args)
        # HF tables repeat the frequencies for both halves (rotate_half): keep the first half
        tables[name] = (np.ascontiguousarray(cos[0, :, :half].float().numpy()),
                        np.ascontiguousarray(sin[0, :, :half].float().numpy()))
    return tables
