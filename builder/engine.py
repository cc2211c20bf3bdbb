"""Engine builds inside arx (thin): check TensorRT + GPU, register the plugins, run trt_build.

Everything that needs TensorRT is in trt_build.py and trt_check.py (shared with the kits) and is
imported only here, after `engine_unavailable_reason()` said TensorRT, Polygraphy and a GPU are
present. A built engine is checked against ONNX Runtime before it is kept (check.py).
"""

from __future__ import annotations

import ctypes
import importlib.util
import tempfile
from pathlib import Path

from arx.errors import ArxError
from arx.manifest import Manifest

from .check import check_engine_file, gate
from .form import TensorRTForm, save_form
from .kit import build_plan
from .options import BuildOptions
from .profiles import block_widths, make_profiles
from .targets import PORTABLE_SM

ENGINE_FILE = "decoder.engine"
REPORT_FILE = "build_report.json"


def cuda_device_count() -> int:
    """GPUs the CUDA driver sees (0 without a driver); needs no Python CUDA package."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def engine_unavailable_reason() -> str | None:
    """None when an engine can be built here, else one line saying what is missing."""
    from arx.errors import MissingDependency
    from arx.plugins._tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except MissingDependency:
        return "TensorRT is not installed here (pip install 'arx[gpu]' and the TensorRT libraries)"
    except ArxError:
        return "TensorRT's Python bindings are here but its libraries (libnvinfer) are not"
    if importlib.util.find_spec("polygraphy") is None:  # builds through it and checks with it
        return "Polygraphy is not installed here (pip install 'arx[gpu]')"
    if cuda_device_count() == 0:
        return "no CUDA GPU is visible on this machine"
    return None


def build_engine_files(folder: Path, form: TensorRTForm, options: BuildOptions,
                       timing_cache: Path, bundle: Path, manifest: Manifest, log=print) -> dict:
    """Build decoder.engine into `folder` (a temp folder the caller renames), check it against
    ONNX Runtime (refused over the tolerance unless --force); return the report."""
    from arx.plugins.tensorrt import register_plugins

    from . import trt_build

    t = options.target_info
    if form.uses_plugins:
        register_plugins(aot_target=PORTABLE_SM if options.portable else t.sm)
    profiles = make_profiles(form.stage, options, form.spec.s_max, block_widths(manifest))
    plan = build_plan(form, profiles, options)
    with tempfile.TemporaryDirectory(prefix="arx-trt-form-") as tmp:
        save_form(form, Path(tmp))
        try:
            report = trt_build.build_engine(plan, str(Path(tmp) / plan["onnx"]),
                                            str(folder / ENGINE_FILE), str(timing_cache), log=log)
        except RuntimeError as e:  # trt_build imports nothing from arx (it ships in kits)
            raise ArxError(f"{str(e).splitlines()[0]}; the TensorRT log above says why; try "
                           f"--no-plugins, or --kit to build on the device") from e
    report.update(target=t.to_json(), precision=options.precision, io=form.stage.to_json(),
                  max_batch=options.batch(), max_seq_len=form.spec.s_max,
                  plan=plan, attention=options.attention, sampler=options.sampler,
                  plugin_impl=options.plugin_impl if form.uses_plugins else None)
    log("  checking the engine against ONNX Runtime (prefill + decode steps)")
    report["check"] = check_engine_file(folder / ENGINE_FILE, bundle, manifest, report["io"],
                                        form.spec.s_max, options.precision)
    gate(report["check"], options.force)  # before the caller renames the folder into place
    return report
