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

It is traced with torch.onnx (dynamo) into a decoder whose cache grows by concatenation
(manifest kv.update = "concat"): correct everywhere, but the slow path. Hugging Face families
get the fused in-place graph instead. A torch.export program of such a module (model.pt2,
arx.export.program) goes to torch.onnx as it is, with the dynamic dims it was exported with.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from arx.errors import ArxError
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


def export_protocol_decoder(src, bundle: Path, options):
    from arx.export.exporter import DecoderExport, resolve_max_seq_len
    from arx.export.graph import save_with_external_data
    from arx.manifest import KVLayout, Stage, TensorSpec

    spec = protocol_spec(src.module)
    L, H, D, V = (int(spec[k]) for k in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"))
    kv = KVLayout(layers=L, kv_heads=H, head_dim=D, update="concat",
                  max_seq_len=resolve_max_seq_len(options, int(spec["max_seq_len"])))
    model = _trace(src, kv)
    save_with_external_data(model, bundle / "decoder.onnx", "decoder.onnx.data")
    cache = ("batch_size", H, "past_sequence_length", D)  # (B, kv_heads, P, D)
    present = ("batch_size", H, "total_sequence_length", D)  # (B, kv_heads, P + S, D)
    inputs = [TensorSpec("input_ids", "int64", ("batch_size", "sequence_length")),
              TensorSpec("position_ids", "int64", ("batch_size", "sequence_length"))]
    inputs += [TensorSpec(p, "float32", cache) for p, _ in kv.pairs()]
    outputs = [TensorSpec("logits", "float32", ("batch_size", "sequence_length", V))]
    outputs += [TensorSpec(q, "float32", present) for _, q in kv.pairs()]
    n_params = int(sum(p.numel() for p in src.module.parameters()))
    info = {"source_format": "arx-protocol", "architecture": type(src.module).__name__,
            "parameters": n_params, "dtype": "float32", "spec": spec}
    stage = Stage("decoder.onnx", tuple(inputs), tuple(outputs))
    return DecoderExport("custom", V, kv, stage, info, 1e-3)


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
