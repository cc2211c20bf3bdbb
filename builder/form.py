"""Bundle -> TensorRT-form ONNX (the stage every engine build and kit starts from)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import onnx
import onnx_ir as ir

from arx.errors import ArxError
from arx.export.graph_ir import SKELETON_DATA, load, save, skeleton, to_proto_in_memory
from arx.export.kv_dtype import restore_decoder
from arx.manifest import Manifest, Stage

from .attention import attach_cache_scales
from .kv_form import form_cache_dtype, retype_form_cache
from .options import BuildOptions
from .precision import apply_precision, check_int8_bundle, check_symmetric_qdq
from .schemas import has_plugin_nodes, register_schemas
from .tensorrt_form import FormSpec, tensorrt_io, to_tensorrt_form

FORM_FILE = "decoder.trt.onnx"
FORM_DATA = "decoder.trt.onnx.data"


@dataclass(frozen=True)
class TensorRTForm:
    """The rewritten decoder as one IR. Its weights stay where they were until save_form
    writes them: the bundle's (memory-mapped from decoder.onnx.data), or the passes' new ones
    (a precision cast is lazy, evaluated per tensor as it is written). So a form of any size
    (an 8B model's 16 GB) is built, checked and saved without the 2 GB protobuf limit and
    without a copy of the model in memory."""

    model: ir.Model
    stage: Stage  # IO of the TensorRT form (derived from the manifest)
    spec: FormSpec
    qdq_nodes: int = 0

    @cached_property
    def skeleton(self) -> onnx.ModelProto:
        """The form's ModelProto without its weights' bytes (the checks, shape inference)."""
        return skeleton(self.model)

    @cached_property
    def proto(self) -> onnx.ModelProto:
        """The whole form as one in-memory ModelProto, weights included: for small forms (an
        ORT session in the tests); over 2 GB protobuf cannot hold it: use save_form."""
        return to_proto_in_memory(self.model)

    @property
    def uses_plugins(self) -> bool:
        """Whether any arx plugin node is left (their PTX and registration are then needed)."""
        return has_plugin_nodes(self.skeleton.graph)


def form_spec(manifest: Manifest, options: BuildOptions) -> FormSpec:
    s_max = options.max_seq_len or manifest.kv.max_seq_len
    cache = form_cache_dtype(manifest, options.precision, options.kv_dtype)
    return FormSpec(s_max=s_max, cache_dtype=cache,
                    sampler=options.sampler, logits=options.logits,
                    aot=options.plugin_impl == "aot", attention=options.attention)


def weight_only_to_qdq(model: ir.Model) -> int:
    """A w8/w4 bundle's MatMulNBits (ORT's packed weight-only op, which TensorRT cannot read)
    as DequantizeLinear(block_size) + MatMul: the Q/DQ-block form TensorRT imports. Lossless:
    the same integer codes and scales. Returns the number of MatMuls rewritten. A w4 bundle's
    int4 embedding (GatherBlockQuantized) becomes a Gather of the values its codes stand for,
    in the form's precision: TensorRT takes int4 weights into matrix products only."""
    ops = {n.op_type for n in model.graph}
    if not ops & {"MatMulNBits", "GatherBlockQuantized"}:
        return 0
    from arx.calibration.embedding_quant import embedding_to_float
    from arx.calibration.weight_only import matmulnbits_to_qdq

    try:
        embedding_to_float(model)
        return matmulnbits_to_qdq(model)
    except ValueError as e:  # asymmetric codes have no symmetric Q/DQ form
        raise ArxError(f"{e}; re-run arx calibrate (its w8/w4 schemes are symmetric)") from e


def make_tensorrt_form(bundle: Path, manifest: Manifest, options: BuildOptions) -> TensorRTForm:
    """Load the bundle's decoder (its weights left on disk), rewrite it to the TensorRT form
    and check it."""
    qdq = 0
    decoder_file = manifest.decoder.file
    if options.precision == "int8":
        check_int8_bundle(manifest)
    path = Path(bundle) / decoder_file
    if not path.is_file():
        raise ArxError(f"bundle {bundle} lacks {decoder_file}; re-export it with arx export")
    spec = form_spec(manifest, options)  # its cache dtype refused here, before any rewrite
    model = load(path)  # one IR for every pass of the form, written once by save_form
    if options.precision == "int8":
        qdq = check_symmetric_qdq(model)
    qdq += weight_only_to_qdq(model)
    scales = restore_decoder(model, manifest.kv)  # --kv-dtype: back to the fp32-cache GQA
    to_tensorrt_form(model, manifest, spec)
    retype_form_cache(model, manifest, spec.cache_dtype, options.precision, scales)
    apply_precision(model, options.precision, {x for pair in manifest.kv.pairs() for x in pair})
    attach_cache_scales(model, spec.cache_dtype, scales)  # fp32 scales: after the precision
    form = TensorRTForm(model, tensorrt_io(manifest, spec), spec, qdq)
    check_form(form.skeleton)
    return form


def check_form(model: onnx.ModelProto) -> None:
    """onnx.checker (full) and strict shape inference; a failure here is an arx bug. `model`
    may be a skeleton (graph_ir.skeleton): neither check reads the weights' bytes."""
    register_schemas()
    try:
        _check_model(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ArxError(f"the TensorRT form failed the ONNX checks ({str(e).splitlines()[0]}); "
                       f"this is an arx bug, please report it") from e


def _check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on `model` saved to a temp folder beside an empty SKELETON_DATA: the
    checker wants a skeleton's external file to exist, never its bytes (it checks the name)."""
    with tempfile.TemporaryDirectory(prefix="arx-form-check-") as tmp:
        onnx.save_model(model, str(Path(tmp) / FORM_FILE))
        (Path(tmp) / SKELETON_DATA).touch()
        onnx.checker.check_model(str(Path(tmp) / FORM_FILE), full_check=True)


def save_form(form: TensorRTForm, folder: Path) -> list[str]:
    """Write decoder.trt.onnx + its weights (external data, streamed tensor by tensor) into
    `folder`; return the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    save(form.model, folder / FORM_FILE, FORM_DATA)
    return [FORM_FILE, FORM_DATA] if (folder / FORM_DATA).exists() else [FORM_FILE]
