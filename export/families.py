"""Model family registry: each family is a small declarative entry.

An entry says how to read a Hugging Face config into the one normalized `DecoderConfig` the
graph builder understands, and where each weight lives in the checkpoint (a table of names).
Adding a family is adding an entry here; unknown architectures fail listing the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from arx.errors import ArxError


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder-only transformer, normalized across families."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    positions: str = "rope"  # "rope" | "learned"
    rotary_dim: int = 0  # 0 when positions are learned
    activation: str = "silu"  # "silu" | "gelu_tanh" | "gelu"
    gated_mlp: bool = True  # act(x W_gate) * (x W_up), else act(x W_up)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # norm of q and k before RoPE (Qwen3, Gemma 3, OLMo 2, StableLM)
    qk_norm_span: str = "head"  # "head": over each head's D | "all": over all heads (OLMo 2)
    tie_embeddings: bool = False
    sliding_window: int | None = None
    attn_scale: float = 0.0  # 0 -> 1/sqrt(head_dim)
    # per layer, HF's layer_types ("sliding_attention" | "full_attention"): the window applies
    # to sliding layers only; empty: to every layer (Mistral)
    layer_types: tuple[str, ...] = ()
    # per layer, the RoPE table it rotates with ("" = no RoPE: SmolLM3's NoPE layers, "local" /
    # "global": Gemma 3's two bases); empty: the one "default" table everywhere
    rope_tables: tuple[str, ...] = ()
    embed_scale: float = 1.0  # inside the embedding (Gemma: sqrt(hidden)); not on inputs_embeds
    input_multiplier: float = 1.0  # on the decoder's input embeddings (Granite)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): Gemma's 1 + w, folded at read
    norm_params: bool = True  # False: LayerNorm without weight or bias (OLMo)
    # "" pre-norm, sequential | "shared": x + attn(n(x)) + mlp(n(x)) (Phi-2, StableLM) |
    # "two_norms": x + attn(n1(x)) + mlp(n2(x)) (GPT-NeoX)
    parallel: str = ""
    residual_scale: float = 1.0  # x + s * f(x) (Granite's residual_multiplier)
    clip_qkv: float = 0.0  # clamp q, k, v to +-clip (OLMo); 0 = none
    attn_softcap: float = 0.0  # scores -> c * tanh(scores / c) (Gemma 2); 0 = none
    final_softcap: float = 0.0  # logits -> c * tanh(logits / c) (Gemma 2)
    logits_scale: float = 1.0  # logits * s (Granite: 1 / logits_scaling)
    lm_head_bias: bool = False  # Phi-2
    # mixture of experts (export/moe_graph.py): E experts of moe_intermediate_size, top k per
    # token, the k weights renormalised to 1 or not; moe_layers: which layers (empty: all)
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()
    # how the MoE layers are emitted: "op" (one com.microsoft MoE node) | "dense" (standard
    # ops); set at export from --moe (export/moe_graph.py moe_form), "" without experts
    moe_form: str = ""

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ArxError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                           f"{self.num_kv_heads}; the checkpoint config is inconsistent")

    def window(self, i: int) -> int | None:
        """The sliding window of layer i, None when it attends to the whole past."""
        if self.layer_types and self.layer_types[i] != "sliding_attention":
            return None
        return self.sliding_window

    def is_moe(self, i: int) -> bool:
        return self.num_experts > 0 and (not self.moe_layers or self.moe_layers[i])

    def rope_table(self, i: int) -> str:
        """The RoPE table layer i rotates q and k with; "" when it has none."""
        if self.positions != "rope":
            return ""
        return self.rope_tables[i] if self.rope_tables else "default"


@dataclass(frozen=True)
class WeightNames:
    """Where each weight lives in the state dict. `{i}` is the layer index.

    Norms and linears are module prefixes: the reader appends `.weight` / `.bias`.

    Linear weights are stored (out, in) by nn.Linear and (in, out) by GPT-2's Conv1D; the
    builder always wants (in, out) for MatMul, `linear_is_out_in` says which to transpose.
    Fused tensors (qkv, gate_up) are split by rows of the (out, in) layout.
    """

    embed: str
    final_norm: str
    lm_head: str | None  # None when tied to the embedding
    attn_norm: str | None  # None: no norm before attention (OLMo 2 norms the outputs)
    mlp_norm: str | None  # None: none before the MLP, or the attention norm's ("shared")
    o: str
    down: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    up: str | None = None
    gate: str | None = None
    gate_up: str | None = None
    q_norm: str | None = None  # "{h}" in the name: one weight per head (StableLM)
    k_norm: str | None = None
    pos_embed: str | None = None
    attn_post_norm: str | None = None  # on the attention output, before the residual add
    mlp_post_norm: str | None = None
    linear_is_out_in: bool = True
    qkv_per_head: bool = False  # fused qkv rows ordered (head, q|k|v, D): GPT-NeoX
    router: str | None = None  # MoE: router linear (E, H)
    experts_gate_up: str | None = None  # MoE: (E, 2I, H) parameter, gate rows first
    experts_down: str | None = None  # MoE: (E, H, I) parameter


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # HF config.model_type values this entry serves
    read_config: Callable[[Any], DecoderConfig]
    weights: WeightNames
    atol: float = 1e-3  # default parity tolerance on logits, fp32
    notes: str = ""


ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _rope_dim(cfg: Any, head_dim: int) -> int:
    """Rotary dims per head: transformers 5 keeps partial_rotary_factor in rope_parameters."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor = getattr(cfg, "partial_rotary_factor", None) or rope.get("partial_rotary_factor")
    return int(head_dim * float(factor or 1.0))


def _llama_like(family: str, **overrides) -> Callable[[Any], DecoderConfig]:
    """Config reader for Llama-shaped models (RoPE, GQA, RMSNorm, gated SiLU MLP); `overrides`
    are values or functions of the HF config, for what a family does differently."""

    def read(cfg: Any) -> DecoderConfig:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
        kw = dict(
            family=family,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            norm_eps=getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", 1e-6),
            rotary_dim=_rope_dim(cfg, head_dim),
            activation=ACTIVATIONS.get(act, act),
            qkv_bias=bool(getattr(cfg, "attention_bias", False)),
            o_bias=bool(getattr(cfg, "attention_bias", False)),
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            sliding_window=getattr(cfg, "sliding_window", None)
            if getattr(cfg, "use_sliding_window", True) else None,
        )
        kw.update({k: (v(cfg) if callable(v) else v) for k, v in overrides.items()})
        return DecoderConfig(**kw)

    return read


def _layer_types(cfg: Any) -> tuple[str, ...]:
    return tuple(getattr(cfg, "layer_types", None) or ())


def _softcap(name: str) -> Callable[[Any], float]:
    return lambda cfg: float(getattr(cfg, name, None) or 0.0)


def _gemma(family: str, **overrides) -> Callable[[Any], DecoderConfig]:
    """Gemma 1/2/3: embedding * sqrt(hidden), RMSNorm by (1 + w), GeGLU, tied head."""
    return _llama_like(family, embed_scale=lambda c: c.hidden_size ** 0.5, norm_offset=1.0,
                       **overrides)


def _gemma2_scale(cfg: Any) -> float:
    return float(cfg.query_pre_attn_scalar) ** -0.5


def _smollm3_rope(cfg: Any) -> tuple[str, ...]:
    return tuple("default" if use else "" for use in cfg.no_rope_layers)


def _smollm3_layer_types(cfg: Any) -> tuple[str, ...]:
    return _layer_types(cfg) if cfg.use_sliding_window else ()


def _qwen3_moe_layers(cfg: Any) -> tuple[bool, ...]:
    """Qwen3-MoE: layer i is sparse unless listed in mlp_only_layers, every decoder_sparse_step."""
    return tuple(i not in (cfg.mlp_only_layers or []) and (i + 1) % cfg.decoder_sparse_step == 0
                 for i in range(cfg.num_hidden_layers))


def _partial_neox_like(family: str, **overrides) -> Callable[[Any], DecoderConfig]:
    """GPT-NeoX / StableLM / Phi-2: LayerNorm with bias, partial rotary."""
    return _llama_like(family, norm="layer", **overrides)


def _gpt2_config(cfg: Any) -> DecoderConfig:
    return DecoderConfig(
        family="gpt2",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_layers=cfg.n_layer,
        num_heads=cfg.n_head,
        num_kv_heads=cfg.n_head,
        head_dim=cfg.n_embd // cfg.n_head,
        intermediate_size=cfg.n_inner or 4 * cfg.n_embd,
        max_position_embeddings=cfg.n_positions,
        norm="layer",
        norm_eps=cfg.layer_norm_epsilon,
        positions="learned",
        activation={"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(
            cfg.activation_function, cfg.activation_function),
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        tie_embeddings=True,
        attn_scale=0.0 if cfg.scale_attn_weights else 1.0,
    )


_LLAMA_WEIGHTS = WeightNames(
    embed="model.embed_tokens.weight",
    final_norm="model.norm",
    lm_head="lm_head.weight",
    attn_norm="model.layers.{i}.input_layernorm",
    mlp_norm="model.layers.{i}.post_attention_layernorm",
    q="model.layers.{i}.self_attn.q_proj",
    k="model.layers.{i}.self_attn.k_proj",
    v="model.layers.{i}.self_attn.v_proj",
    o="model.layers.{i}.self_attn.o_proj",
    gate="model.layers.{i}.mlp.gate_proj",
    up="model.layers.{i}.mlp.up_proj",
    down="model.layers.{i}.mlp.down_proj",
)



def _replace(names: WeightNames, **changes) -> WeightNames:
    return WeightNames(**{**names.__dict__, **changes})


_GEMMA2_WEIGHTS = _replace(
    _LLAMA_WEIGHTS, attn_post_norm="model.layers.{i}.post_attention_layernorm",
    mlp_norm="model.layers.{i}.pre_feedforward_layernorm",
    mlp_post_norm="model.layers.{i}.post_feedforward_layernorm")


_MOE_WEIGHTS = _replace(_LLAMA_WEIGHTS, router="model.layers.{i}.mlp.gate",
                        experts_gate_up="model.layers.{i}.mlp.experts.gate_up_proj",
                        experts_down="model.layers.{i}.mlp.experts.down_proj")


def _refuse(option: str, family: str) -> Callable[[Any], bool]:
    """A config option arx does not emit yet: refused in one line rather than ignored."""
    def check(cfg: Any) -> bool:
        if getattr(cfg, option, False):
            raise ArxError(f"{family} with {option}=True is not supported by arx yet; export a "
                           f"checkpoint without it or wrap the model in the decoder protocol")
        return False
    return check


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", ("llama",), _llama_like("llama"), _LLAMA_WEIGHTS),
        Family("mistral", ("mistral",), _llama_like("mistral"), _LLAMA_WEIGHTS),
        Family("qwen2", ("qwen2",), _llama_like("qwen2", qkv_bias=True, o_bias=False),
               _LLAMA_WEIGHTS),
        Family("qwen3", ("qwen3",), _llama_like("qwen3", qk_norm=True),
               _replace(_LLAMA_WEIGHTS, q_norm="model.layers.{i}.self_attn.q_norm",
                        k_norm="model.layers.{i}.self_attn.k_norm")),
        Family("phi3", ("phi3",), _llama_like("phi3", mlp_bias=False),
               _replace(_LLAMA_WEIGHTS, q=None, k=None, v=None, gate=None, up=None,
                        qkv="model.layers.{i}.self_attn.qkv_proj",
                        gate_up="model.layers.{i}.mlp.gate_up_proj")),
        Family("gemma", ("gemma",), _gemma("gemma"), _LLAMA_WEIGHTS),
        Family("gemma2", ("gemma2",), _gemma(
            "gemma2", attn_scale=_gemma2_scale, layer_types=_layer_types,
            attn_softcap=_softcap("attn_logit_softcapping"),
            final_softcap=_softcap("final_logit_softcapping")), _GEMMA2_WEIGHTS),
        Family("gemma3_text", ("gemma3_text",), _gemma(
            "gemma3_text", attn_scale=_gemma2_scale, layer_types=_layer_types,
            rope_tables=_layer_types, qk_norm=True, attn_softcap=_softcap("attn_logit_softcapping"),
            final_softcap=_softcap("final_logit_softcapping")),
            _replace(_GEMMA2_WEIGHTS, q_norm="model.layers.{i}.self_attn.q_norm",
                     k_norm="model.layers.{i}.self_attn.k_norm")),
        Family("phi", ("phi",), _partial_neox_like(
            "phi", parallel="shared", gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True,
            lm_head_bias=True, qk_norm=_refuse("qk_layernorm", "phi")),
            _replace(_LLAMA_WEIGHTS, final_norm="model.final_layernorm", mlp_norm=None,
                     o="model.layers.{i}.self_attn.dense", gate=None,
                     up="model.layers.{i}.mlp.fc1", down="model.layers.{i}.mlp.fc2")),
        Family("olmo", ("olmo",), _llama_like(
            "olmo", norm="layer", norm_params=False, norm_eps=1e-5,
            clip_qkv=lambda c: float(c.clip_qkv or 0.0)), _LLAMA_WEIGHTS),
        Family("olmo2", ("olmo2",), _llama_like("olmo2", qk_norm=True, qk_norm_span="all"),
               _replace(_LLAMA_WEIGHTS, attn_norm=None, mlp_norm=None,
                        attn_post_norm="model.layers.{i}.post_attention_layernorm",
                        mlp_post_norm="model.layers.{i}.post_feedforward_layernorm",
                        q_norm="model.layers.{i}.self_attn.q_norm",
                        k_norm="model.layers.{i}.self_attn.k_norm")),
        Family("granite", ("granite",), _llama_like(
            "granite", input_multiplier=lambda c: float(c.embedding_multiplier),
            residual_scale=lambda c: float(c.residual_multiplier),
            attn_scale=lambda c: float(c.attention_multiplier),
            logits_scale=lambda c: 1.0 / float(c.logits_scaling)), _LLAMA_WEIGHTS),
        Family("smollm3", ("smollm3",), _llama_like(
            "smollm3", rope_tables=_smollm3_rope, layer_types=_smollm3_layer_types),
            _LLAMA_WEIGHTS),
        Family("gpt_neox", ("gpt_neox",), _partial_neox_like(
            "gpt_neox", gated_mlp=False, mlp_bias=True,
            parallel=lambda c: "two_norms" if c.use_parallel_residual else ""),
            WeightNames(embed="gpt_neox.embed_in.weight", final_norm="gpt_neox.final_layer_norm",
                        lm_head="lm_head.weight", attn_norm="gpt_neox.layers.{i}.input_layernorm",
                        mlp_norm="gpt_neox.layers.{i}.post_attention_layernorm",
                        qkv="gpt_neox.layers.{i}.attention.query_key_value", qkv_per_head=True,
                        o="gpt_neox.layers.{i}.attention.dense",
                        up="gpt_neox.layers.{i}.mlp.dense_h_to_4h",
                        down="gpt_neox.layers.{i}.mlp.dense_4h_to_h")),
        Family("stablelm", ("stablelm",), _partial_neox_like(
            "stablelm", qkv_bias=lambda c: bool(c.use_qkv_bias), o_bias=False,
            qk_norm=lambda c: bool(c.qk_layernorm),
            parallel=lambda c: "shared" if c.use_parallel_residual else ""),
            _replace(_LLAMA_WEIGHTS, q_norm="model.layers.{i}.self_attn.q_layernorm.norms.{h}",
                     k_norm="model.layers.{i}.self_attn.k_layernorm.norms.{h}")),
        Family("mixtral", ("mixtral",), _llama_like(
            "mixtral", num_experts=lambda c: c.num_local_experts,
            experts_per_token=lambda c: c.num_experts_per_tok,
            moe_intermediate_size=lambda c: c.intermediate_size), _MOE_WEIGHTS),
        Family("qwen3_moe", ("qwen3_moe",), _llama_like(
            "qwen3_moe", qk_norm=True, num_experts=lambda c: c.num_experts,
            experts_per_token=lambda c: c.num_experts_per_tok,
            moe_intermediate_size=lambda c: c.moe_intermediate_size,
            norm_topk_prob=lambda c: bool(c.norm_topk_prob), moe_layers=_qwen3_moe_layers),
            _replace(_MOE_WEIGHTS, q_norm="model.layers.{i}.self_attn.q_norm",
                     k_norm="model.layers.{i}.self_attn.k_norm")),
        Family("gpt2", ("gpt2",), _gpt2_config,
               WeightNames(embed="transformer.wte.weight", pos_embed="transformer.wpe.weight",
                           final_norm="transformer.ln_f", lm_head=None,
                           attn_norm="transformer.h.{i}.ln_1", mlp_norm="transformer.h.{i}.ln_2",
                           qkv="transformer.h.{i}.attn.c_attn", o="transformer.h.{i}.attn.c_proj",
                           up="transformer.h.{i}.mlp.c_fc", down="transformer.h.{i}.mlp.c_proj",
                           linear_is_out_in=False)),
    ]
}


def supported_architectures() -> str:
    return ", ".join(sorted(FAMILIES))


def family_for_model_type(model_type: str | None) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise ArxError(f"unsupported architecture {model_type!r}; supported: {supported_architectures()} "
                   f"(or wrap your model in the arx decoder protocol, see README)")
