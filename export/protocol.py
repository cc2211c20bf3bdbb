"""The arx decoder protocol: how a custom `nn.Module` (not a Hugging Face model) is exported.

A module follows the protocol when it has

    arx_decoder = {"num_layers": L, "num_kv_heads": Hkv, "head_dim": D, "vocab_size": V,
                   "max_seq_len": N}          # optional "eos_token_id": int

    def forward(self, input_ids, position_ids, past_key_values):
        # input_ids, position_ids: (B, S) int64; past_key_values: list of L (key, value)
        # pairs, each (B, Hkv, P, D) float32 (P may be 0)
        # returns logits (B, S, V) and the list of L (key, value) pairs, each
        # (B, Hkv, P + S, D): the past with this step's keys/values appended
        return logits, present

When its attention over the cache is written the plain way (torch.cat of past and new keys and
values, then scaled_dot_product_attention or an explicit softmax with a causal mask built from
shapes), or through `arx.export.kv_attention`, it is exported to the in-place form of the
built-in families (export/fast_path.py): the same IO (attention_mask, logits_indices, the cache
as (B, Hkv, S_max, D) buffers), one GroupQueryAttention node per layer, kv.update = "in_place",
and the general-step graph beside it. Otherwise it is traced as it is into a decoder whose
cache grows by concatenation (kv.update = "concat"): correct everywhere, but the slow path,
and export says so in one line (SlowPathWarning) naming the reason and the call to use. A
torch.export program of such a module (model.pt2, arx.export.program) takes the same two
routes: its .module() for the fast one, the program as it is, with its own dynamic dims, for
the slow one.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np

from arx.errors import ArxError
from arx.manifest import KVLayout
from arx.export.torch_output import error_summary, quiet_torch, user_call

REQUIRED_KEYS = ("num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_seq_len")


def protocol_spec(module) -> dict:
    spec = getattr(module, "arx_decoder", None)
    if not isinstance(spec, dict):
        return {}
    return spec


def check_protocol(module, path: Path) -> None:
    spec = protocol_spec(module)
    missing = [k for k in REQUIRED_KEYS if k not in spec]
    if not spec or missing:
        from arx.export.families import supported_architectures

        what = f"its arx_decoder dict lacks {', '.join(missing)}" if spec else "it has no arx_decoder dict"
        raise ArxError(f"{path} holds a {type(module).__name__} that is neither a Hugging Face causal "
                       f"LM ({supported_architectures()}) nor an arx decoder-protocol module "
                       f"({what}); see 'Decoder protocol' in the README")


def _flat_module(module, layers: int):
    """Wrap `module` so the cache is flat tensors (k0, v0, k1, ...) for tracing."""
    import torch

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, input_ids, position_ids, *flat_past):
            past = [(flat_past[2 * i], flat_past[2 * i + 1]) for i in range(layers)]
            logits, present = self.inner(input_ids, position_ids, past)
            return (logits, *[t for pair in present for t in pair])

    return Flat()


class SlowPathWarning(UserWarning):
    """A protocol module exported with the concatenating cache: the reason and what to do."""


def export_protocol_decoder(src, bundle: Path, options, *, embeds: int | None = None,
                            block: bool = False):
    """embeds: forward's first input is inputs_embeds (B, S, embeds), not ids; block: every
    layer is kv_attention(mask="block") (a next-scale model), which only the fast path runs."""
    from arx.export.exporter import DecoderExport, resolve_max_seq_len

    spec = protocol_spec(src.module)
    L, H, D, V = (int(spec[k]) for k in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"))
    kv = KVLayout(layers=L, kv_heads=H, head_dim=D,
                 max_seq_len=resolve_max_seq_len(options, int(spec["max_seq_len"])))
    n_params = int(sum(p.numel() for p in src.module.parameters()))
    info = {"source_format": "arx-protocol", "architecture": type(src.module).__name__,
            "parameters": n_params, "dtype": "float32", "spec": spec}
    fast = _export_in_place(src, bundle, kv, V, embeds, block)
    if isinstance(fast, str) and block:  # the concatenating graph has no block mask
        raise ArxError(f"{type(src.module).__name__} does not export to the in-place form its "
                       f"block steps need: {fast}; call arx.export.kv_attention(..., "
                       f"mask='block') in every layer (README, 'Next-scale prediction')")
    if isinstance(fast, str):
        kv = dataclasses.replace(kv, update="concat")
        stage = _export_concat(src, bundle, kv, V)
        info["attention"] = {"path": "concat", "reason": fast}
        warnings.warn(f"{type(src.module).__name__} exports on the slow path (concatenating "
                      f"cache: no ragged batches, multi-token steps or arx build): {fast}; write "
                      f"the attention as torch.cat + scaled_dot_product_attention with a causal "
                      f"attn_mask, or call arx.export.kv_attention (README, 'Decoder "
                      f"protocol')", SlowPathWarning, stacklevel=2)
        return DecoderExport("custom", V, kv, stage, info, 1e-3)
    stage, extra, layers = fast
    info["attention"] = {"path": "in_place", "layers": layers}
    return DecoderExport("custom", V, kv, stage, info, 1e-3, **extra)


def _export_in_place(src, bundle: Path, kv, vocab: int, embeds: int | None = None,
                     block: bool = False):
    """(stage, step-graph fields, how each layer was recognised), or why the fast path was
    not taken."""
    from arx.export.decoder_graph import B, K, PAST, S, TOTAL
    from arx.export.graph import save_with_external_data
    from arx.manifest import Stage, TensorSpec

    if kv.head_dim % 16:
        return (f"head_dim {kv.head_dim} is not a multiple of 16, which onnxruntime's "
                f"GroupQueryAttention needs")
    cache = (B, kv.kv_heads, PAST, kv.head_dim)  # (B, kv_heads, S_max, D) buffers
    tokens = TensorSpec("inputs_embeds", "float32", (B, S, embeds)) if embeds else \
        TensorSpec("input_ids", "int64", (B, S))
    inputs = [tokens, TensorSpec("attention_mask", "int64", (B, TOTAL)),
              TensorSpec("position_ids", "int64", (B, S)), TensorSpec("logits_indices", "int64", (B, K))]
    inputs += [TensorSpec(p, "float32", cache) for p, _ in kv.pairs()]
    outputs = [TensorSpec("logits", "float32", (B, K, vocab))]
    outputs += [TensorSpec(q, "float32", cache) for _, q in kv.pairs()]
    try:
        from arx.export.fast_path import NotRecognised, layer_kinds, trace_in_place

        model, matches = trace_in_place(src.module, kv, [t.name for t in inputs],
                                        [t.name for t in outputs], embeds=embeds, block=block)
    except NotRecognised as e:
        return str(e)
    except Exception as e:  # noqa: BLE001  (anything torch raises: the slow path decides)
        return f"tracing it to the in-place form failed ({error_summary(e)})"
    model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.31 reads IR <= 13
    stage = Stage("decoder.onnx", tuple(inputs), tuple(outputs))
    save_with_external_data(model, bundle / stage.file, stage.file + ".data")
    return stage, _step_graph(model, stage, kv, bundle), layer_kinds(matches)


def _step_graph(model, stage, kv, bundle: Path) -> dict:
    """The general-step graph (export/step_graph.py) beside decoder.onnx, as for HF families."""
    from arx.export.step_graph import EXTENSION, STEP_STAGE, build_step_graph, save_step_graph

    step_model, step_stage = build_step_graph(model, stage, kv)  # weights shared with the decoder
    return {"extra_stages": {STEP_STAGE: step_stage},
            "extensions": {EXTENSION: save_step_graph(step_model, step_stage, bundle, stage)}}


def _export_concat(src, bundle: Path, kv, vocab: int):
    from arx.export.graph import save_with_external_data
    from arx.manifest import Stage, TensorSpec

    model = _trace(src, kv)
    save_with_external_data(model, bundle / "decoder.onnx", "decoder.onnx.data")
    cache = ("batch_size", kv.kv_heads, "past_sequence_length", kv.head_dim)  # (B, kv_heads, P, D)
    present = ("batch_size", kv.kv_heads, "total_sequence_length", kv.head_dim)  # (B, kv_heads, P + S, D)
    inputs = [TensorSpec("input_ids", "int64", ("batch_size", "sequence_length")),
              TensorSpec("position_ids", "int64", ("batch_size", "sequence_length"))]
    inputs += [TensorSpec(p, "float32", cache) for p, _ in kv.pairs()]
    outputs = [TensorSpec("logits", "float32", ("batch_size", "sequence_length", vocab))]
    outputs += [TensorSpec(q, "float32", present) for _, q in kv.pairs()]
    return Stage("decoder.onnx", tuple(inputs), tuple(outputs))


def _trace(src, kv):
    """torch.onnx (dynamo) export with symbolic batch, sequence and past length."""
    import torch

    if src.program is not None:  # an ExportedProgram: its inputs and dynamic dims are its own
        target, example, dyn = src.program, (), None
    else:
        target, (example, dyn) = _flat_module(src.module, kv.layers).eval(), _example_inputs(kv)
    with warnings.catch_warnings(), quiet_torch():
        warnings.simplefilter("ignore")  # the tracer's notes are not the user's problem
        try:
            program = torch.onnx.export(
                target, example, dynamo=True, dynamic_shapes=dyn,
                input_names=["input_ids", "position_ids"] + [p for p, _ in kv.pairs()],
                output_names=["logits"] + [q for _, q in kv.pairs()], opset_version=21,
                verbose=False)
        except Exception as e:  # torch.export raises many kinds of errors for untraceable code
            where = user_call(e)
            raise ArxError(f"could not trace {type(src.module).__name__} to ONNX "
                           f"({error_summary(e)}){f' at {where}' if where else ''}; keep forward() "
                           f"free of data-dependent Python control flow and follow the decoder "
                           f"protocol (README)") from e
    model = program.model_proto
    model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.31 reads IR <= 13
    return model


def _example_inputs(kv):
    """Example inputs for the flat wrapper, and their dynamic dims (batch, sequence, past)."""
    import torch

    dim = torch.export.Dim
    batch, seq, past = dim("batch_size"), dim("sequence_length"), dim("past_sequence_length")
    n = 2 * kv.layers
    example = (torch.zeros(2, 3, dtype=torch.long), torch.arange(3, 6).repeat(2, 1),
               *[torch.zeros(2, kv.kv_heads, 3, kv.head_dim) for _ in range(n)])
    # forward(input_ids, position_ids, *flat_past): the varargs take one nested entry
    dyn = ({0: batch, 1: seq}, {0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in range(n)))
    return example, dyn


def protocol_reference(module):
    """Reference steps for parity: the module itself, batch 1, growing its own cache."""
    import torch

    spec = protocol_spec(module)
    L, H, D = int(spec["num_layers"]), int(spec["num_kv_heads"]), int(spec["head_dim"])

    def step(tokens: np.ndarray, state):
        past = state or [(torch.zeros(1, H, 0, D), torch.zeros(1, H, 0, D)) for _ in range(L)]
        p = past[0][0].shape[2]
        pos = torch.arange(p, p + tokens.shape[1])[None, :]
        with torch.no_grad():
            logits, present = module(torch.from_numpy(tokens), pos, past)
        return logits.float().numpy(), [k.numpy() for k, _ in present], present

    return step
