"""The next-scale protocol (VAR, arXiv 2404.02905): a decoder-protocol module whose steps are
whole scales of a token pyramid, plus its multi-scale residual VQ-VAE.

A module is a next-scale model when it has `arx_decoder` (vocab_size = the codebook,
max_seq_len = L = sum of pn^2) and

    arx_var = {"patch_nums": [1, 2, 3, 4, 6],  # side of each scale's token map, coarse to fine
               "num_classes": C, "null_class": C,  # class labels; the CFG rows' label
               "vq": "vae",                    # attribute: the VQ-VAE (below)
               "pixel_range": [-1.0, 1.0],     # optional: what vae.fhat_to_img spans
               "cfg_scale": 4.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0}  # defaults

    class_emb(class_ids (B,)) -> (B, D)            the condition (SOS and AdaLN), row C the null
    forward(inputs_embeds (B, S, Cvae + D), position_ids (B, S), past) -> logits (B, S, V), present
        per position its input features (f_hat area-downsampled to this scale, ignored at
        position 0: the SOS) then its row's class embedding; every layer's attention is
        arx.export.kv_attention(..., mask="block")
    vae.quantize.embedding                          nn.Embedding (V, Cvae), the codebook
    vae.quantize.get_next_autoregressive_input(si, S, f_hat, h) -> (f_hat', next map)   VAR's
    vae.fhat_to_img(f_hat (B, Cvae, hw, hw)) -> pixels (B, 1|3, H, W)

The bundle (pipeline kind "next-scale"):

    var_class           class_ids (B,) ─► cond (B, D)
    decoder             inputs_embeds [features | cond] ─► logits, the KV cache of all earlier
        │               scales (in place; steps of a whole scale run decoder_step.onnx with the
        │               block mask; the width-1 SOS step the fused graph, where both masks agree)
        ▼ sample every position of scale k at once (arx::sample, CFG over [cond; null] rows)
    var_next_input_k    tokens (B, pn_k^2), f_hat ─► f_hat_out, next_input (B, pn_k+1^2, Cvae)
        ▼ (the last scale: f_hat_out only)
    vq_decoder          f_hat (B, Cvae, hw, hw) ─► pixels (B, C, H, W)

One next-input graph per scale: each traces the module's own code at that scale's fixed sizes
(bicubic up, its phi conv, area down), so arx does not re-implement VAR's resampling.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from arx.errors import ArxError
from arx.manifest import Pipeline, PipelineStep, TokenSpace

VAR_SECTION = "var"
CLASS_STAGE, VQ_STAGE, VAR_SPACE = "var_class", "vq_decoder", "var"
REQUIRED = ("patch_nums", "num_classes", "vq")


def next_stage(k: int) -> str:
    return f"var_next_input_{k}"


def var_spec(module) -> dict | None:
    spec = getattr(module, "arx_var", None)
    return spec if isinstance(spec, dict) else None


def check_var_spec(module, spec: dict) -> dict:
    """The spec with defaults filled in; one-line errors for what a user got wrong."""
    import torch

    name = type(module).__name__
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise ArxError(f"{name}.arx_var lacks {', '.join(missing)}; see 'Next-scale "
                       f"prediction' in the README")
    pns = [int(p) for p in spec["patch_nums"]]
    if len(pns) < 2 or pns[0] != 1 or any(b <= a for a, b in zip(pns, pns[1:])):
        raise ArxError(f"{name}.arx_var patch_nums must rise from 1 over at least 2 scales, "
                       f"got {spec['patch_nums']}")
    seq = sum(p * p for p in pns)
    if int(module.arx_decoder["max_seq_len"]) < seq:
        raise ArxError(f"{name}.arx_decoder max_seq_len {module.arx_decoder['max_seq_len']} is "
                       f"shorter than the {seq} tokens of patch_nums {pns}")
    vq = str(spec["vq"])
    vae = getattr(module, vq, None)
    if not isinstance(vae, torch.nn.Module):
        raise ArxError(f"{name} has no nn.Module {vq!r}, which arx_var['vq'] names as its "
                       f"VQ-VAE; see 'Next-scale prediction' in the README")
    quant = getattr(vae, "quantize", None)
    needs = {"class_emb": getattr(module, "class_emb", None), f"{vq}.fhat_to_img":
             getattr(vae, "fhat_to_img", None), f"{vq}.quantize.embedding":
             getattr(quant, "embedding", None), f"{vq}.quantize.get_next_autoregressive_input":
             getattr(quant, "get_next_autoregressive_input", None)}
    absent = [k for k, v in needs.items() if v is None]
    if absent:
        raise ArxError(f"{name} lacks {', '.join(absent)}; see 'Next-scale prediction' in the "
                       f"README")
    out = {"patch_nums": pns, "num_classes": int(spec["num_classes"]),
           "null_class": int(spec.get("null_class", spec["num_classes"])), "vq": vq,
           "pixel_range": [float(v) for v in spec.get("pixel_range", (-1.0, 1.0))],
           "cfg_scale": float(spec.get("cfg_scale", 0.0)), "top_k": int(spec.get("top_k", 0)),
           "top_p": float(spec.get("top_p", 1.0)), "temperature": float(spec.get("temperature", 1.0)),
           "tokens": seq}
    if out["num_classes"] < 1 or not 0 <= out["null_class"] < module.class_emb.num_embeddings:
        raise ArxError(f"{name}.arx_var needs num_classes >= 1 and a null_class row of class_emb "
                       f"(0..{module.class_emb.num_embeddings - 1}), got {out['null_class']}")
    return out


def export_var(src, bundle: Path, options):
    """DecoderExport of the decoder (embeddings in, block steps), the class, next-input and
    pixel stages, the token space, the pipeline and the `var` section; parity over all of them."""
    import torch

    from arx.export.image_protocol import _without
    from arx.export.protocol import export_protocol_decoder
    from arx.export import var_stages
    from arx.export.var_parity import var_parity

    module = src.module.eval()
    spec = check_var_spec(module, var_spec(module))
    vae = getattr(module, spec["vq"]).eval()
    cvae = int(vae.quantize.embedding.weight.shape[1])
    with torch.no_grad():
        d = int(module.class_emb(torch.zeros(1, dtype=torch.long)).shape[-1])
    with _without(module, spec["vq"]):  # the VQ-VAE's weights live in its own stages
        decoder = export_protocol_decoder(src, bundle, options, embeds=cvae + d, block=True)
    stages = var_stages.export_stages(module, vae, spec, bundle)
    pixels = stages[VQ_STAGE].outputs[0].shape[1:]
    hw = spec["patch_nums"][-1]
    last = next_stage(len(spec["patch_nums"]) - 1)
    pipeline = Pipeline(kind="next-scale", token_space=VAR_SPACE, feedback="inputs_embeds",
                        then=(PipelineStep(VQ_STAGE, {"f_hat": f"{last}.f_hat_out"}),))
    section = {**{k: spec[k] for k in ("patch_nums", "num_classes", "null_class", "cfg_scale",
                                       "top_k", "top_p", "temperature", "tokens")},
               "cfg_schedule": "var", "feature_dim": cvae, "cond_dim": d, "latent": [hw, hw],
               "class_stage": CLASS_STAGE,
               "next_input_stages": [next_stage(k) for k in range(len(spec["patch_nums"]))],
               "pixels": {"stage": VQ_STAGE, "layout": "NCHW", "range": spec["pixel_range"],
                          "channels": pixels[0], "height": pixels[1], "width": pixels[2]}}
    decoder.model_info["var"] = {"vae_parameters": int(sum(p.numel() for p in vae.parameters()))}
    return dataclasses.replace(
        decoder, plain_stages={**decoder.plain_stages, **stages}, pipeline=pipeline,
        token_spaces={VAR_SPACE: TokenSpace("codebook", decoder.vocab_size, (hw, hw))},
        extensions={**decoder.extensions, VAR_SECTION: section},
        parity=lambda tmp, manifest, opts: var_parity(module, vae, tmp, manifest, decoder.atol,
                                                      opts))
