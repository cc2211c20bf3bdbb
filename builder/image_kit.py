"""The VQ decoder of an image-token bundle as its own engine in a build kit.

    kits/<target>/
      vq_decoder.onnx(.data)   the bundle's vq_decoder stage (tokens (I, N) int64 -> pixels
                               (I, C, H, W)) at the kit's precision: fp16/bf16 weights and
                               activations, pixels returned in fp32 (builder/precision.py);
                               an int8 kit's is fp16, its Q/DQ scales cover the decoder only
      build_vq_decoder.sh      trtexec, one profile over the images of a step: 1 .. max
                               (half the decoder engine's cache rows, its [cond; null] pairs)
      kit.json "stages"        decoder (build_engine.py) and vq_decoder, each with its ONNX,
                               engine, build command and profiles

The VQ decoder is plain convolutions and a codebook gather, so TensorRT builds it without the
arx plugins, with trtexec alone; it runs once per image, after the token loop, so a separate
engine costs one more launch per batch, not per token.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from arx.errors import ArxError
from arx.export.graph_ir import from_proto, to_proto
from arx.manifest import Manifest

from .form import check_form
from .options import BuildOptions
from .precision import apply_precision
from .profiles import Profile, dim_ranges, trtexec_shapes, with_images

VQ_ONNX, VQ_ENGINE, VQ_SCRIPT = "vq_decoder.onnx", "vq_decoder.engine", "build_vq_decoder.sh"


def vq_form(bundle: Path, manifest: Manifest, precision: str,
            name: str | None = None) -> tuple[onnx.ModelProto, str]:
    """(the vq_decoder stage at `precision`, its stage name); name: the stage (a next-scale
    bundle's), else the image-token bundle's VQ stage."""
    from arx.runtime.image_generate import image_info

    name = name or image_info(manifest, bundle).vq_stage
    path = Path(bundle) / manifest.stages[name].file
    if not path.is_file():
        raise ArxError(f"bundle {bundle} lacks {path.name}; re-export it with arx export")
    ir_model = from_proto(onnx.load(str(path)))
    apply_precision(ir_model, precision, set())
    model = to_proto(ir_model)
    check_form(model)
    return model, name


def vq_profile(manifest: Manifest, stage: str, options: BuildOptions) -> Profile:
    """Images 1 .. max, as the decoder engine's sampler rows (one per [cond; null] pair); the
    input's other dims are static: tokens (I, N), or a next-scale f_hat (I, Cvae, h, w)."""
    tokens = manifest.stages[stage].inputs[0]
    dims = tuple(int(d) for d in tokens.shape[1:])
    images = with_images(dim_ranges(options, manifest.kv.max_seq_len)["decode"])["images"]
    return Profile("images", {tokens.name: tuple((i, *dims) for i in images)})


def write_image_stages(folder: Path, bundle: Path, manifest: Manifest,
                       options: BuildOptions) -> tuple[list[str], list[dict]]:
    """Write the VQ decoder's ONNX and build script; (files, kit.json "stages" entries)."""
    from .form import FORM_FILE

    files, vq = write_vq_engine(folder, bundle, manifest, options)
    return files, [{"name": "decoder", "onnx": FORM_FILE, "engine": "decoder.engine",
                    "build": "python3 build_engine.py"}, vq]


def write_vq_engine(folder: Path, bundle: Path, manifest: Manifest, options: BuildOptions,
                    name: str | None = None) -> tuple[list[str], dict]:
    """The VQ decoder's ONNX and build script (stage `name`, vq_form's default else); (files,
    its kit.json "stages" entry)."""
    model, name = vq_form(bundle, manifest, options.precision, name)
    onnx.save_model(model, str(folder / VQ_ONNX), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"{VQ_ONNX}.data", size_threshold=1024)
    files = [f.name for f in sorted(folder.glob(f"{VQ_ONNX}*"))]
    profile = vq_profile(manifest, name, options)
    (folder / VQ_SCRIPT).write_text(vq_script(profile))
    (folder / VQ_SCRIPT).chmod(0o755)
    return [*files, VQ_SCRIPT], {"name": name, "onnx": VQ_ONNX, "engine": VQ_ENGINE,
                                 "build": f"./{VQ_SCRIPT}", "io": manifest.stages[name].to_json(),
                                 "profiles": [profile.to_json()]}


def vq_script(profile: Profile) -> str:
    shapes = " ".join(f"--{kind}Shapes={trtexec_shapes(profile, i)}"
                      for i, kind in enumerate(("min", "opt", "max")))
    return f"""#!/usr/bin/env bash
# Build the VQ decoder engine (tokens -> pixels) with trtexec: standard ONNX ops, no arx
# plugins; the precision is in the graph (TensorRT 11 is strongly typed). Run after or beside build_engine.py.
set -euo pipefail
cd "$(dirname "$0")"
trtexec --onnx={VQ_ONNX} --saveEngine={VQ_ENGINE} {shapes} "$@"
"""
