"""The weight-only schemes' token embedding: the Gather of the (V, H) table by input_ids as com.microsoft
GatherBlockQuantized over int4 codes, symmetric, one float scale per block of `group_size`
along H of each row (ORT's quantizer's Gather path, the one that makes calibration.weight_only's
MatMulNBits). In the TensorRT form (`embedding_to_float`) the table is dequantized back to float,
the values the codes stand for: TensorRT's int4 weights feed matrix products only.

    ids (B, S) ─ GatherBlockQuantized(codes int4 (V, H), scales (V, H/bs), block_size=bs) ─► (B, S, H)

A tied LM head is quantized too (MatMulNBits over the table's transpose): its codes are the
table's, so the Gather reads them instead of a second copy (head_codes_embedding), at w4's 4
bits or w8's 8. An untied table gets int4 codes of its own at w4 and stays float at w8 (ORT's
quantizer writes Gathers at 4 bits only).

    lm_head blob uint8 (V, H/bs, bs*bits/8) ───────────┐
    ids (B, S) ─ GatherBlockQuantized(bits, quantize_axis=2, lm_head scales (V, H/bs, 1))
               ─► (B, S, H/bs, bs) ─ Reshape ─► (B, S, H)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from arx.calibration.weight_only import SYMMETRIC, _quiet, _stack, _unpack
from arx.export.graph import MS_DOMAIN
from arx.export.graph_ir import add_initializer, take_place

ROWS = 8192  # EmbeddingQuantizer's chunk of V (a 4096-column table: 128 MB in float32)
EMBEDDING_BITS = 4  # ORT's quantizer quantizes Gathers at 4 bits only (own codes)
SHARED_BITS = (4, 8)  # GatherBlockQuantized reads a head's 4- and 8-bit MatMulNBits codes
TOKEN_IDS = "input_ids"


class EmbeddingQuantizer:
    """The token embedding's Gather as GatherBlockQuantized: ORT's node quantizer on its Gather
    path (symmetric int4, one float scale per block of `group_size` along H), ROWS rows at a
    time. Each row's blocks are its own and H is even, so the chunks' packed codes are whole
    bytes and, laid end to end, the whole table's: a 128k-row table's float32 copies inside the
    quantizer stay a chunk's size. Calibrate and the streamed export both call it, so their
    bundles hold the same bytes."""

    def __init__(self, *, group_size: int):
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                      DefaultWeightOnlyQuantizer)

        config = DefaultWeightOnlyQuantConfig(block_size=group_size, is_symmetric=SYMMETRIC,
                                              op_types_to_quantize=("Gather",),
                                              quant_axes=(("Gather", 1),), bits=EMBEDDING_BITS)
        self._quantizer = DefaultWeightOnlyQuantizer(config)
        _quiet()

    def quantize(self, node: onnx.NodeProto, table: np.ndarray
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """(nodes replacing Gather `node`, their initializers: int4 codes with raw packed bytes,
        float32 scales) for the (V, H) `table` its input 0 names; any float dtype."""
        v, h = table.shape
        if h % 2:
            raise ValueError(f"{node.name}: an embedding of odd width {h} has no whole-byte int4 rows")
        starts = range(0, v, ROWS)
        # numpy releases the GIL in the quantizer's array passes: chunks on every core
        with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1)) as pool:
            parts = list(pool.map(lambda a: self._quantize_rows(node, table[a:a + ROWS]), starts))
        nodes, (codes, scales) = parts[0]
        if len(parts) > 1:
            codes = onnx.helper.make_tensor(codes.name, codes.data_type, [v, h],
                                            b"".join(p[1][0].raw_data for p in parts), raw=True)
            scales = _stack([p[1][1] for p in parts])
        return nodes, [codes, scales]

    def _quantize_rows(self, node: onnx.NodeProto, rows: np.ndarray):
        table = numpy_helper.from_array(np.ascontiguousarray(rows, dtype=np.float32), node.input[0])
        graph = helper.make_graph([node], "one_gather", [], [], initializer=[table])
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks (a padding row)
            nodes = self._quantizer.quantize(node, [graph])  # are 0 codes, scale 0: no NaN kept
        made = {t.name: t for t in graph.initializer if t.name != table.name}
        (quantized,) = nodes
        return nodes, (made[quantized.input[0]], made[quantized.input[2]])


def token_embedding(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The Gather of a 2-D initializer by `input_ids`, where nothing else reads the table (a
    tied float LM head's Transpose does: the table then stays float); None otherwise."""
    inits = {t.name: t for t in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and len(n.input) == 2
               and n.input[1] == TOKEN_IDS and n.input[0] in inits
               and len(inits[n.input[0]].dims) == 2]
    if len(gathers) != 1:
        return None
    table = gathers[0].input[0]
    readers = [n for n in model.graph.node for i in n.input if i == table]
    return gathers[0] if len(readers) == 1 else None


def embedding_plan(*, bits: int, group_size: int, width: int, head: str | None) -> str | None:
    """How a token table of `width` is quantized: "head" (it reads the codes of tied LM head
    `head`, quantized at `bits`: head_codes_embedding), "own" (int4 codes of its own) or None
    (it stays float: no own codes at other bits). Calibrate and the streamed export both ask."""
    if head is not None and bits in SHARED_BITS and width % group_size == 0:
        return "head"
    return "own" if bits == EMBEDDING_BITS else None


def quantize_embedding(model: onnx.ModelProto, *, group_size: int, head: str | None = None,
                       bits: int = EMBEDDING_BITS) -> dict | None:
    """Rewrite `model`'s token embedding (token_embedding) in place as GatherBlockQuantized:
    over the codes of MatMulNBits `head` (the tied LM head, untied to be quantized) where they
    can be read as its rows (head_codes_embedding), else over int4 codes of its own (only
    those: at other `bits` the table then stays float). Returns the manifest's record of it
    (embedding_record), or None where the table stays as it is."""
    node = token_embedding(model)
    if node is None:
        return None
    table = next(t for t in model.graph.initializer if t.name == node.input[0])
    plan = embedding_plan(bits=bits, group_size=group_size, width=table.dims[1], head=head)
    made = None
    if plan == "head":
        matmul = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and (
            n.name == head or n.name.startswith(head + "_Q"))), None)  # (ORT's "_Q4"/"_Q8")
        made = matmul is not None and head_codes_embedding(matmul, node, tuple(table.dims))
    if not made and bits != EMBEDDING_BITS:
        return None
    nodes, tensors = made or EmbeddingQuantizer(group_size=group_size).quantize(
        node, numpy_helper.to_array(table))
    position = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    for offset, new in enumerate(nodes):
        model.graph.node.insert(position + offset, new)
    model.graph.initializer.remove(table)
    model.graph.initializer.extend(tensors)
    return embedding_record(table.name, head if made else None, bits)


def embedding_record(table: str, head: str | None, bits: int = EMBEDDING_BITS) -> dict:
    """The manifest's `quantization.embedding` for a quantized table; `head`: the LM head
    whose codes it reads, None for codes of its own."""
    return {"table": table, "format": "GatherBlockQuantized", "bits": bits,
            "codes": f"shared with {head}" if head else "own"}


def head_codes_embedding(head: onnx.NodeProto, gather: onnx.NodeProto, table_shape: tuple
                         ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    """Gather `gather` as a reader of the tied LM head's codes instead of a table of its own:
    a uint8 GatherBlockQuantized at the head's 4 or 8 bits (whose default zero point is
    MatMulNBits' implicit one, 8 or 128) over the head's blob itself, (V, K/bs, bs*bits/8)
    blocked along its last axis, with the
    head's scales viewed (V, K/bs, 1); its (B, S, K/bs, bs) rows viewed (B, S, H). The blob is
    read in place: a Reshape of it would be folded into a second copy when the session loads.
    None where the head's rows are not the table's: another op or width, other bits, zero
    points, or K not a multiple of the block (the blob's rows are padded to whole blocks)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    if head.op_type != "MatMulNBits" or attrs.get("bits") not in SHARED_BITS \
            or (attrs.get("N"), attrs.get("K")) != tuple(table_shape) \
            or attrs["K"] % attrs["block_size"] or (len(head.input) > 3 and head.input[3]):
        return None
    name, k_blocks = gather.name, attrs["K"] // attrs["block_size"]
    scale_shape = numpy_helper.from_array(np.array([attrs["N"], k_blocks, 1], np.int64),
                                          f"{name}/scales_shape")
    row_shape = numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{name}/row_shape")
    nodes = [helper.make_node("Reshape", [head.input[2], scale_shape.name], [f"{name}/scales"],
                              name=f"{name}/scales"),
             helper.make_node("GatherBlockQuantized", [head.input[1], gather.input[1],
                                                       f"{name}/scales"],
                              [f"{name}/blocks"], name=name, domain=MS_DOMAIN,
                              bits=attrs["bits"], block_size=attrs["block_size"],
                              gather_axis=0, quantize_axis=2),
             helper.make_node("Reshape", [f"{name}/blocks", row_shape.name], list(gather.output),
                              name=f"{name}/rows")]
    return nodes, [scale_shape, row_shape]


def embedding_to_float(model: ir.Model) -> int:
    """Every GatherBlockQuantized of `model` (onnx_ir, in place: the TensorRT form) as a Gather
    of its table dequantized to float32 (the form's precision casts it after): codes of its
    own, or the tied head's (head_codes_embedding). Returns how many."""
    nodes = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    for node in nodes:
        attrs = {name: a.value for name, a in node.attributes.items()}
        if attrs.get("gather_axis", 0) != 0 or len(node.inputs) > 3:
            raise ValueError(f"{node.name}: only the row-gathered symmetric forms arx writes "
                             f"have a float form here")
        codes, ids, scales = node.inputs
        if attrs.get("quantize_axis", 1) == 1:  # a table of its own: (V, H) int4
            signed, block_scales, gone = codes.const_value.numpy(), scales.const_value.numpy(), [node]
        else:  # the head's blob (V, K/bs, bs/2), viewed back to rows by a Reshape
            signed, block_scales, gone = _head_rows(node)
        table = add_initializer(model.graph, f"{node.name}.table",
                                _dequantize_rows(signed, block_scales, attrs["block_size"]))
        gather = ir.node("Gather", [table, ids], {"axis": 0}, outputs=[ir.Value()],
                         name=node.name + "_float")
        take_place(gone[-1].outputs[0], gather.outputs[0])
        model.graph.insert_before(node, [gather])
        read = [v for n in gone for v in n.inputs if v is not None]
        for n in reversed(gone):
            model.graph.remove(n, safe=True)
        for value in read:
            if value.is_initializer() and not value.uses():
                model.graph.initializers.pop(value.name)
    return len(nodes)


def _head_rows(node: ir.Node) -> tuple[np.ndarray, np.ndarray, list[ir.Node]]:
    """(signed codes (V, H), scales (V, K/bs), the nodes the float Gather replaces) of a
    GatherBlockQuantized over the head's blob: unsigned codes, zero point 2^(bits-1)."""
    codes, _, scales = node.inputs
    scale_view, (rows,) = scales.producer(), [use.node for use in node.outputs[0].uses()]
    if codes.const_value is None or scale_view is None or rows.op_type != "Reshape":
        raise ValueError(f"{node.name}: its codes are neither a table nor a head's blob")
    blob = codes.const_value.numpy()  # (V, K/bs, bs/2)
    v, k_blocks = blob.shape[:2]
    bits = next(a.value for name, a in node.attributes.items() if name == "bits")
    signed = _unpack(blob, bits, k_blocks * blob.shape[2] * 8 // bits, v, k_blocks)
    signed = signed.astype(np.int16) - (1 << (bits - 1))
    block_scales = scale_view.inputs[0].const_value.numpy().reshape(v, k_blocks)
    return signed, block_scales, [scale_view, node, rows]


def _dequantize_rows(codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """int4 codes (V, H) times their block's scale (V, ceil(H / block)) -> float32 (V, H)."""
    v, h = codes.shape
    out = np.empty((v, h), dtype=np.float32)
    for a in range(0, v, ROWS):  # a chunk at a time: no (V, H) temporaries beside `out`
        c = codes[a:a + ROWS].astype(np.float32)
        out[a:a + ROWS] = c * np.repeat(scales[a:a + ROWS], block, axis=1)[:, :h]
    return out


