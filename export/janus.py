"""Janus (transformers' JanusForConditionalGeneration) -> a text-to-image bundle.

Janus draws an image as a raster of VQ codebook tokens with its Llama language model, in
"image" generation mode (transformers' `generate(..., generation_mode="image")`):

    prompt ids ─► embedder (the LM's text table) ─┐                 rows [cond; uncond]
                                                  ▼
    decoder   inputs_embeds (B,S,H) ─► Llama layers ─► final norm ─► generation head ─► logits
              (the generation head, proj_out ─ GELU ─ vision_head, is the decoder's head:
               logits (B, K, codebook), not the text LM head)
        ▲                                                           │ sampled id (CFG mix)
        └── image_embed   ids (B,S) ─► generation_embeddings ─► generation_aligner ◄┘
    vq_decoder   tokens (B, N) ─► JanusVQVAE.decode ─► pixels (B, 3, H, W) in [-1, 1]

Why the generation head replaces the LM head in the graph rather than being a stage of its
own or an extra output: image mode never reads text logits, and an extra output would compute
the text head (102400 x 2048 in Janus-Pro-1B, more work than the generation head) every
step; a separate head stage would cost one more ORT run and a hidden-state round trip per
token. The bundle is therefore for image generation; text generation from Janus is its LM
exported alone. The decoder takes `inputs_embeds` (as `arx export --inputs-embeds`), so the
same graph serves the text prompt (through `embedder`) and the image-token feedback (through
`image_embed`, the pipeline's `embed` stage, which `DecoderSession.step` runs on ids).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.export.embedder import EMBEDDER_STAGE
from arx.export.graph import GraphBuilder, save_with_external_data
from arx.export.image_protocol import IMAGE_SECTION, IMAGE_SPACE, VQ_STAGE, export_vq_stage
from arx.manifest import Pipeline, PipelineStep, Stage, TensorSpec, TokenSpace

IMAGE_EMBED_STAGE, IMAGE_EMBED_FILE = "image_embed", "image_embed.onnx"
GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # ONNX Gelu modes
DEFAULT_CFG = 5.0  # transformers' Janus generate when the generation config sets none
UNCOND = "every prompt token but BOS and BOI replaced by PAD (transformers' Janus generate)"


def janus_source(path: Path, module, tokenizer_dir):
    """LoadedSource of a JanusForConditionalGeneration (its language model's family: llama)."""
    from arx.export.families import family_for_model_type
    from arx.export.sources import LoadedSource

    text = module.config.text_config
    family = family_for_model_type(getattr(text, "model_type", None))
    gen = module.generation_config.to_dict() if module.generation_config is not None else {}
    return LoadedSource(path, module.float().eval(), "janus", family, tokenizer_dir, gen)


def load_janus_folder(path: Path, tokenizer_dir):
    import torch
    from transformers import JanusForConditionalGeneration

    from arx.export.torch_output import error_summary

    try:
        model = JanusForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # transformers/safetensors raise many types for a broken checkpoint
        raise ArxError(f"could not load the Janus checkpoint in {path} ({error_summary(e)}); "
                       f"the weights look corrupt or incomplete, re-download or re-save "
                       f"them") from e
    return janus_source(path, model, tokenizer_dir)


def export_janus(src, bundle: Path, options):
    """DecoderExport: decoder (generation head) + embedder + image_embed + vq_decoder."""
    from arx.export.hf_decoder import export_hf_decoder

    model = src.module
    vq_cfg, text_cfg = model.config.vq_config, model.config.text_config
    hidden, codebook = int(text_cfg.hidden_size), int(vq_cfg.num_embeddings)
    if int(vq_cfg.projection_dim) != hidden or int(vq_cfg.image_token_embed_dim) != hidden:
        raise ArxError(f"this Janus config's vq_config projection_dim {vq_cfg.projection_dim} / "
                       f"image_token_embed_dim {vq_cfg.image_token_embed_dim} differ from the "
                       f"language model's hidden size {hidden}; the checkpoint is inconsistent")
    if getattr(options, "dtype", "float32") != "float32":
        raise ArxError("Janus bundles are exported in float32 only for now; drop --dtype")
    tokens = _special_tokens(src.generation_config)
    decoder = export_hf_decoder(_language_model_source(src), bundle,
                                dataclasses.replace(options, inputs_embeds=True),
                                head=_generation_head(model.model.generation_head, vq_cfg.hidden_act))
    embed_stage = _export_image_embed(model, bundle, vq_cfg.hidden_act)
    side = int(vq_cfg.num_patches)
    vq = vq_decode_module(model.model.vqmodel)
    vq_stage, vq_error = export_vq_stage(vq, bundle, {"grid": [side, side]}, codebook)
    decoder.plain_stages = {**decoder.plain_stages, IMAGE_EMBED_STAGE: embed_stage,
                            VQ_STAGE: vq_stage}
    decoder.pipeline = Pipeline(kind="image-tokens", token_space=IMAGE_SPACE,
                                feedback="inputs_embeds", embed=IMAGE_EMBED_STAGE,
                                then=(PipelineStep(VQ_STAGE, {"tokens": "loop.tokens"}),))
    decoder.token_spaces = {IMAGE_SPACE: TokenSpace("codebook", codebook, (side, side)),
                            "text": TokenSpace("text", int(text_cfg.vocab_size))}
    decoder.extensions = {**decoder.extensions,
                          IMAGE_SECTION: _image_section(src, tokens, side, vq_stage, vq_error,
                                                        codebook)}
    decoder.model_info = {**decoder.model_info, "architecture": type(model).__name__,
                          "image": {"vq_parameters": int(sum(p.numel() for p in vq.parameters())),
                                    "codebook": codebook}}
    decoder.reference = janus_reference(model)
    return decoder


def _language_model_source(src):
    """The Janus language model as a Llama causal-LM source: Llama's weight names (model.*,
    lm_head), its rotary_emb, and a config whose vocabulary is the codebook, since the decoder's
    logits are the generation head's."""
    import copy

    import torch

    from arx.export.sources import LoadedSource

    janus = src.module
    config = copy.deepcopy(janus.config.text_config)
    config.vocab_size = int(janus.config.vq_config.num_embeddings)
    config.tie_word_embeddings = False  # the decoder has no text head: keep the table out of it

    class JanusLanguageModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config
            self.model = janus.model.language_model
            self.lm_head = janus.lm_head  # read by the weight table, not emitted (head=)

    lm = JanusLanguageModel().eval()
    fields = {"tensors": _state_dict_source(lm)} if hasattr(src, "tensors") else {}
    return LoadedSource(src.path, lm, "hf", src.family, None, src.generation_config, **fields)


def _state_dict_source(module):
    try:
        from arx.export.tensor_source import StateDictSource
    except ImportError:  # before streamed export: the decoder reads module.state_dict()
        return None
    return StateDictSource(module.state_dict())


def _special_tokens(gen: dict) -> dict:
    boi = (gen.get("generation_kwargs") or {}).get("boi_token_id", gen.get("boi_token_id"))
    tokens = {"bos_token_id": gen.get("bos_token_id"), "pad_token_id": gen.get("pad_token_id"),
              "boi_token_id": boi}
    missing = [k for k, v in tokens.items() if v is None]
    if missing:
        raise ArxError(f"the Janus checkpoint's generation_config.json lacks {', '.join(missing)} "
                       f"(boi_token_id under generation_kwargs), which the image prompt and its "
                       f"unconditional twin need; add them as the original checkpoint has them")
    return {k: int(v) for k, v in tokens.items()}


def _image_section(src, tokens: dict, side: int, vq_stage: Stage, vq_error: dict,
                   codebook: int) -> dict:
    gen = src.generation_config
    channels, height, width = vq_stage.outputs[0].shape[1:]
    return {"condition": {"kind": "text", "embedder": EMBEDDER_STAGE, **tokens,
                          "unconditional": UNCOND},
            "grid": [side, side], "tokens_per_image": side * side,
            "cfg_scale": float(gen.get("guidance_scale") or DEFAULT_CFG),
            "top_k": int(gen.get("top_k") or 0), "temperature": float(gen.get("temperature") or 1.0),
            # NCHW as JanusVQVAE.decode returns it; decode_image_tokens is its NHWC permute
            "pixels": {"stage": VQ_STAGE, "layout": "NCHW", "range": [-1.0, 1.0],
                       "channels": channels, "height": height, "width": width},
            "vq_parity": vq_error,
            # the generation head is over the codebook alone: nothing to cut off (offset 0)
            "codebook": {"offset": 0, "size": codebook}}


def _gelu_mode(act: str) -> str:
    if act not in GELU:
        raise ArxError(f"Janus vq_config hidden_act {act!r} is not emitted by arx (known: "
                       f"{', '.join(GELU)}); please report the checkpoint")
    return GELU[act]


def _linear(g: GraphBuilder, x: str, linear, name: str, out: str | None = None) -> str:
    """x @ W^T + b of an nn.Linear, as MatMul + Add (the (in, out) table MatMul wants)."""
    w = np.ascontiguousarray(linear.weight.detach().float().numpy().T)
    y = g.op("MatMul", x, g.weight(f"{name}.weight", w), name=name)
    b = g.weight(f"{name}.bias", linear.bias.detach().float().numpy())
    return g.node("Add", [y, b], [out] if out else 1, name=f"{name}.bias")[0]


def _generation_head(head, act: str):
    """rows (B, K, H) ─proj_out─ GELU ─vision_head─► logits (B, K, codebook)."""
    mode = _gelu_mode(act)

    def emit(g: GraphBuilder, rows: str) -> None:
        x = _linear(g, rows, head.proj_out, "generation_head.proj_out")
        x = g.op("Gelu", x, approximate=mode, name="generation_head.act")
        _linear(g, x, head.vision_head, "generation_head.vision_head", out="logits")

    return emit


def _export_image_embed(model, bundle: Path, act: str) -> Stage:
    """image_embed.onnx:

        input_ids (B,S) ─Gather(generation_embeddings (codebook, E))─ fc1 ─┬─► inputs_embeds
                                                                           └ [GELU ─ Linear]*
    """
    mode = _gelu_mode(act)
    aligner, hidden = model.model.generation_aligner, int(model.config.text_config.hidden_size)
    g = GraphBuilder("arx_image_embed")
    g.input("input_ids", "int64", ("batch_size", "sequence_length"))
    table = model.model.generation_embeddings.weight.detach().float().numpy()
    x = g.op("Gather", g.weight("generation_embeddings.weight", table), "input_ids")
    layers = [aligner.fc1, *aligner.hidden_layers]
    for i, layer in enumerate(layers):
        if i:
            x = g.op("Gelu", x, approximate=mode, name=f"generation_aligner.act{i}")
        x = _linear(g, x, layer, f"generation_aligner.{i}",
                    out="inputs_embeds" if i == len(layers) - 1 else None)
    g.output("inputs_embeds", "float32", ("batch_size", "sequence_length", hidden))
    save_with_external_data(g.model(), bundle / IMAGE_EMBED_FILE, IMAGE_EMBED_FILE + ".data")
    return Stage(IMAGE_EMBED_FILE, (TensorSpec("input_ids", "int64", ("batch_size", "sequence_length")),),
                 (TensorSpec("inputs_embeds", "float32",
                             ("batch_size", "sequence_length", hidden)),), token_space=IMAGE_SPACE)


def vq_decode_module(vqmodel):
    """tokens (B, N) -> JanusVQVAE.decode pixels (B, 3, H, W): the vq_decoder stage's module."""
    import torch

    class VQDecode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vqmodel = vqmodel

        def forward(self, tokens):
            return self.vqmodel.decode(tokens)

    return VQDecode().eval()


def janus_reference(model):
    """Parity reference: image ids -> image_embed -> the language model -> generation head,
    with transformers' own cache (the bundle's loop path for the token feedback)."""
    import torch

    def step(tokens: np.ndarray, state):
        with torch.no_grad():
            embeds = model.prepare_embeddings_for_image_generation(torch.from_numpy(tokens))
            out = model.model.language_model(inputs_embeds=embeds, past_key_values=state,
                                             use_cache=True)
            logits = model.model.generation_head(out.last_hidden_state)
        cache = out.past_key_values
        return logits.float().numpy(), [layer.keys.float().numpy() for layer in cache.layers], cache

    return step
