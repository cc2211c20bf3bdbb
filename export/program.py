"""`torch.export.save` programs (model.pt2) that follow the arx decoder protocol.

An ExportedProgram keeps the graph and weights but none of the module's Python attributes, so
the protocol's `arx_decoder` dict travels in the archive as an extra file:

    ep = torch.export.export(model, (input_ids, position_ids, past_key_values),
                             dynamic_shapes=...)   # batch, sequence and past lengths dynamic
    torch.export.save(ep, "model.pt2",
                      extra_files={"arx_decoder.json": json.dumps(model.arx_decoder)})

The program is checked against that dict here (inputs, dtypes, which dims are dynamic), then
exported like a pickled protocol module (arx.export.protocol): where its attention over the
cache is recognised it is re-traced through `ep.module()` into the in-place form
(export/fast_path.py); otherwise it goes to torch.onnx as it is, with the concatenating cache.
Parity is checked through `ep.module()` either way.
"""

from __future__ import annotations

import json
from pathlib import Path

from arx.errors import ArxError
from arx.export.protocol import check_protocol
from arx.export.sources import LoadedSource, has_tokenizer
from arx.export.torch_output import error_summary, quiet_torch

SPEC_FILE = "arx_decoder.json"
HOW = ("export it with dynamic_shapes making batch, sequence and past lengths dynamic "
       "(torch.export.Dim), or give torch.save(model) of the nn.Module")


def load_program(path: Path) -> LoadedSource:
    import torch

    extra = {SPEC_FILE: ""}
    try:
        with quiet_torch():
            program = torch.export.load(path, extra_files=extra)
    except Exception as e:  # a damaged archive or one from another torch version
        raise ArxError(f"{path} is a torch.export archive that could not be loaded "
                       f"({error_summary(e)}); save it again with torch.export.save, or give "
                       f"torch.save(model) of the nn.Module") from e
    module = program.module()
    module.arx_decoder = _spec(path, extra[SPEC_FILE])  # where the protocol looks for it
    check_protocol(module, path)
    _check_signature(path, program, module.arx_decoder)
    tok_dir = path.parent if has_tokenizer(path.parent) else None
    return LoadedSource(path, module, "protocol", None, tok_dir, {}, program=program)


def _spec(path: Path, text: str) -> dict:
    if not text:
        raise ArxError(f"{path} is a torch.export program without {SPEC_FILE}; save it with "
                       f"torch.export.save(ep, path, extra_files={{'{SPEC_FILE}': "
                       f"json.dumps(model.arx_decoder)}}) (see 'Model sources' in the README)")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArxError(f"{SPEC_FILE} in {path} is not valid JSON ({e}); write it with "
                       f"json.dumps(model.arx_decoder)") from e
    return spec if isinstance(spec, dict) else {}


def _user_inputs(program) -> list:
    """The fake tensors of the program's flattened user inputs, in call order."""
    names = set(program.graph_signature.user_inputs)
    return [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in names]


def _check_signature(path: Path, program, spec: dict) -> None:
    """forward(input_ids, position_ids, past_key_values) with the protocol's shapes and dims."""
    import torch

    layers, heads, head_dim = (int(spec[k]) for k in ("num_layers", "num_kv_heads", "head_dim"))
    inputs = _user_inputs(program)
    if len(inputs) != 2 + 2 * layers or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ArxError(f"{path} takes {len(inputs)} tensors, but the decoder protocol with "
                       f"{layers} layers takes input_ids, position_ids and {layers} (key, value) "
                       f"pairs; export forward(input_ids, position_ids, past_key_values)")
    for i, t in enumerate(inputs):
        name = ("input_ids", "position_ids")[i] if i < 2 else f"past_key_values[{(i - 2) // 2}]"
        dtype, rank = (torch.int64, 2) if i < 2 else (torch.float32, 4)
        if t.dtype != dtype or t.dim() != rank or (i >= 2 and (t.shape[1], t.shape[3]) != (heads, head_dim)):
            raise ArxError(f"{path}: {name} is {str(t.dtype)[6:]} {tuple(t.shape)}, the decoder "
                           f"protocol needs {str(dtype)[6:]} of rank {rank}"
                           + (f" shaped (B, {heads}, P, {head_dim})" if i >= 2 else ""))
        dynamic = {0: "batch", 1: "sequence"} if i < 2 else {0: "batch", 2: "past"}
        for axis, what in dynamic.items():
            if not isinstance(t.shape[axis], torch.SymInt):
                raise ArxError(f"{path}: the program's {what} length is fixed at "
                               f"{t.shape[axis]} ({name} dim {axis}); {HOW}")
            if what == "past" and _lowest(program, t.shape[axis]) > 0:
                raise ArxError(f"{path}: the program's past length starts at "
                               f"{_lowest(program, t.shape[axis])}, but prefill has no past; "
                               f"declare it as torch.export.Dim('past', min=0), or give "
                               f"torch.save(model) of the nn.Module")


def _lowest(program, size) -> int:
    """The smallest value a dynamic dim may take in `program`."""
    bound = program.range_constraints.get(size.node.expr)
    return int(bound.lower) if bound is not None else 0
