"""Bundle -> TensorRT-form ONNX (the stage every engine build and kit starts from)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from arx.errors import ArxError
from arx.export.graph_ir import from_proto, to_proto
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
    model: onnx.ModelProto
    stage: Stage  # IO of the TensorRT form (derived from the manifest)
    spec: FormSpec
    qdq_nodes: int = 0

    @property
    def uses_plugins(self) -> bool:
        """Whether any arx plugin node is left (their PTX and registration are then needed)."""
        return has_plugin_nodes(self.model.graph)


def form_spec(manifest: Manifest, options: BuildOptions) -> FormSpec:
    s_max = options.max_seq_len or manifest.kv.max_seq_len
    cache = form_cache_dtype(manifest, options.precision, options.kv_dtype)
    return FormSpec(s_max=s_max, cache_dtype=cache,
                    sampler=options.sampler, logits=options.logits,
                    aot=options.plugin_impl == "aot", attention=options.attention)


def weight_only_to_qdq(model: ir.Model) -> int:
    """A w8/w4 bundle's MatMulNBits (ORT's packed weight-only op, which TensorRT cannot read)
    as DequantizeLinear(block_size) + MatMul: the Q/DQ-block form TensorRT imports. Lossless:
    the same integer codes and scales. Returns the number of MatMuls rewritten."""
    if not any(n.op_type == "MatMulNBits" for n in model.graph):
        return 0
    from arx.calibration.weight_only import matmulnbits_to_qdq

    try:
        return matmulnbits_to_qdq(model)
    except ValueError as e:  # asymmetric codes have no symmetric Q/DQ form
        raise ArxError(f"{e}; re-run arx calibrate (its w8/w4 schemes are symmetric)") from e


def make_tensorrt_form(bundle: Path, manifest: Manifest, options: BuildOptions) -> TensorRTForm:
    """Load the bundle's decoder, rewrite it to the TensorRT form and check it."""
    qdq = 0
    decoder_file = manifest.decoder.file
    if options.precision == "int8":
        check_int8_bundle(manifest)
    path = Path(bundle) / decoder_file
    if not path.is_file():
        raise ArxError(f"bundle {bundle} lacks {decoder_file}; re-export it with arx export")
    model = onnx.load(str(path))  # with external data: the form is written as a new file
    spec = form_spec(manifest, options)  # its cache dtype refused here, before any rewrite
    if options.precision == "int8":
        qdq = check_symmetric_qdq(model)
    ir_model = from_proto(model)  # one IR for every pass of the form, one proto at the end
    qdq += weight_only_to_qdq(ir_model)
    scales = restore_decoder(ir_model, manifest.kv)  # --kv-dtype: back to the fp32-cache GQA
    to_tensorrt_form(ir_model, manifest, spec)
    retype_form_cache(ir_model, manifest, spec.cache_dtype, options.precision, scales)
    apply_precision(ir_model, options.precision, {x for pair in manifest.kv.pairs() for x in pair})
    attach_cache_scales(ir_model, spec.cache_dtype, scales)  # fp32 scales: after the precision
    model = to_proto(ir_model)
    check_form(model)
    return TensorRTForm(model, tensorrt_io(manifest, spec), spec, qdq)


def check_form(model: onnx.ModelProto) -> None:
    """onnx.checker (full) and strict shape inference; a failure here is an arx bug."""
    register_schemas()
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ArxError(f"the TensorRT form failed the ONNX checks ({str(e).splitlines()[0]}); "
                       f"this is an arx bug, please report it") from e


def save_form(form: TensorRTForm, folder: Path) -> list[str]:
    """Write decoder.trt.onnx + its weights (external data) into `folder`; return file names."""
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.ModelProto.FromString(form.model.SerializeToString())
    onnx.save_model(model, str(folder / FORM_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=FORM_DATA, size_threshold=1024)
    return [FORM_FILE, FORM_DATA] if (folder / FORM_DATA).exists() else [FORM_FILE]
