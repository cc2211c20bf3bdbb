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
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    tie_embeddings: bool = False
    sliding_window: int | None = None
    attn_scale: float = 0.0  # 0 -> 1/sqrt(head_dim)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ArxError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                           f"{self.num_kv_heads}; the checkpoint config is inconsistent")


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
    attn_norm: str
    mlp_norm: str
    o: str
    down: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    up: str | None = None
    gate: str | None = None
    gate_up: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    pos_embed: str | None = None
    linear_is_out_in: bool = True


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # HF config.model_type values this entry serves
    read_config: Callable[[Any], DecoderConfig]
    weights: WeightNames
    atol: float = 1e-3  # default parity tolerance on logits, fp32
    notes: str = ""


def _rope_dim(cfg: Any, head_dim: int) -> int:
    return int(head_dim * float(getattr(cfg, "partial_rotary_factor", None) or 1.0))


def _llama_like(family: str, **overrides) -> Callable[[Any], DecoderConfig]:
    """Config reader for Llama-shaped models (RoPE, GQA, RMSNorm, gated SiLU MLP)."""

    def read(cfg: Any) -> DecoderConfig:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
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
            norm_eps=cfg.rms_norm_eps,
            rotary_dim=_rope_dim(cfg, head_dim),
            activation={"silu": "silu", "gelu": "gelu"}.get(cfg.hidden_act, cfg.hidden_act),
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

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama", ("llama",), _llama_like("llama"), _LLAMA_WEIGHTS),
        Family("mistral", ("mistral",), _llama_like("mistral"), _LLAMA_WEIGHTS),
        Family("qwen2", ("qwen2",), _llama_like("qwen2", qkv_bias=True, o_bias=False),
               _LLAMA_WEIGHTS),
        Family("qwen3", ("qwen3",), _llama_like("qwen3", qk_norm=True),
               WeightNames(**{**_LLAMA_WEIGHTS.__dict__,
                              "q_norm": "model.layers.{i}.self_attn.q_norm",
                              "k_norm": "model.layers.{i}.self_attn.k_norm"})),
        Family("phi3", ("phi3",), _llama_like("phi3", mlp_bias=False),
               WeightNames(**{**_LLAMA_WEIGHTS.__dict__, "q": None, "k": None, "v": None,
                              "qkv": "model.layers.{i}.self_attn.qkv_proj",
                              "gate": None, "up": None,
                              "gate_up": "model.layers.{i}.mlp.gate_up_proj"})),
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
