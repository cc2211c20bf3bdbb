"""The small stages of a next-scale (VAR) bundle in a build kit.

    kits/<target>/
      decoder.trt.onnx          the transformer (block steps of embeddings, every position's
                                logits, one profile per scale width): build_engine.py
      vq_decoder.onnx, build_vq_decoder.sh
                                f_hat (I, Cvae, h, w) -> pixels, its own engine at the kit's
                                precision (builder/image_kit.py, as for image-token bundles)
      var_class.onnx, var_next_input_<k>.onnx (+ .data)
                                the bundle's own ONNX, run by ONNX Runtime on the host
      kit.json "stages"         every stage: its ONNX, and its engine and build command, or
                                "runtime": "onnxruntime"

Why the class table and the next-input stages stay on ONNX Runtime: var_class is one gather per
generation; var_next_input_k (codebook lookup, upsampling, one residual convolution on a
(rows, Cvae, h, w) map) runs once per scale, next to a transformer step over the whole scale, and
each would be one more engine and build per scale for microseconds of work (Janus' embedders in
builder/image_form.py stay on ORT for the same reason). The VQ decoder is the one heavy
convolution stack, so it gets an engine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from arx.errors import ArxError
from arx.manifest import Manifest

from .image_kit import write_vq_engine
from .options import BuildOptions

STAGES_NOTE = ("\nA next-scale kit has a second engine, the VQ decoder (f_hat -> pixels; no arx\n"
               "plugins): `./build_vq_decoder.sh` builds vq_decoder.engine with trtexec, one\n"
               "profile over the images of a batch. var_class.onnx and var_next_input_<k>.onnx\n"
               "(the class embedding and each scale's next input) run on ONNX Runtime on the\n"
               "host (kit.json \"stages\"). The decoder engine's rows are [cond; null]: two cache\n"
               "rows per image; each step is one whole scale (its own profile).\n")


def _copy_stage(folder: Path, bundle: Path, file: str) -> list[str]:
    """The stage's ONNX and its external data, as the bundle has them."""
    src = Path(bundle) / file
    if not src.is_file():
        raise ArxError(f"bundle {bundle} lacks {file}; re-export it with arx export")
    names = [file, *(p.name for p in sorted(src.parent.glob(f"{src.name}.data")))]
    for name in names:
        shutil.copyfile(src.parent / name, folder / name)
    return names


def write_var_stages(folder: Path, bundle: Path, manifest: Manifest,
                     options: BuildOptions) -> tuple[list[str], list[dict]]:
    """Write the VQ decoder's engine files and the ORT stages; (files, kit.json "stages")."""
    from arx.runtime.var_generate import var_info

    from .form import FORM_FILE

    info = var_info(manifest, bundle)
    files, vq = write_vq_engine(folder, bundle, manifest, options, info.vq_stage)
    stages = [{"name": "decoder", "onnx": FORM_FILE, "engine": "decoder.engine",
               "build": "python3 build_engine.py"}]
    for name in (info.class_stage, *info.next_stages):
        stage = manifest.stages[name]
        files += _copy_stage(folder, bundle, stage.file)
        stages.append({"name": name, "onnx": stage.file, "runtime": "onnxruntime",
                       "io": stage.to_json()})
    return files, [*stages, vq]
