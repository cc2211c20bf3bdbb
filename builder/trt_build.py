#!/usr/bin/env python3
"""Build a TensorRT engine from a TensorRT-form decoder and its build plan (kit.json "build").

This one file serves twice: `arx build` imports it (arx.builder.trt_build) when TensorRT and a
GPU are present, and every build kit carries a verbatim copy as build_engine.py, run on the
device with only TensorRT's Python package: it imports nothing from arx (stdlib + tensorrt).
After a kit's build, main() runs the kit's engine check (check_engine.py, which needs Polygraphy).

    python build_engine.py                  # in the kit folder: writes decoder.engine, checks it
    python build_engine.py --kit DIR --engine OUT.engine --timing-cache FILE [--no-check] [--force]

Not built through Polygraphy's loaders: the network must be made here anyway (the AOT/JIT plugin
preference is a creation flag its ONNX loader cannot set), so CreateConfig and
EngineBytesFromNetwork would save 3 of 89 lines, write the timing cache in place under a .lock
file instead of by rename, and make Polygraphy a requirement of every build.
Written against the TensorRT 11.x Python API: every network is strongly typed (precision comes
from the graph's casts and Q/DQ nodes); no precision builder flags exist or are set.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ALIASED_IO_FEATURE = "ALIASED_PLUGIN_IO_10_03"  # plugin outputs aliased to inputs (KV cache)


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        import tensorrt_bindings as trt  # the name of the pip wheel of the bindings

        sys.modules.setdefault("tensorrt", trt)  # the engine check's Polygraphy imports `tensorrt`
    return trt


def _network_flags(trt, plan):
    """STRONGLY_TYPED (a no-op on 11.x, required on 10.x) and the AOT/JIT plugin preference."""
    names = ["STRONGLY_TYPED"]
    names.append("PREFER_AOT_PYTHON_PLUGINS" if plan.get("prefer_aot", True)
                 else "PREFER_JIT_PYTHON_PLUGINS")
    flags = 0
    for name in names:
        flag = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if flag is not None:
            flags |= 1 << int(flag)
    return flags


def _make_progress(trt, log):
    """A one-line progress display through IProgressMonitor (phase name, step/steps)."""

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps

        def step_complete(self, phase_name, step):
            log(f"\r  {phase_name}: {step + 1}/{self.steps.get(phase_name, '?')}", end="")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Progress()


def _parse(trt, network, logger, onnx_path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    return parser


def _configure(trt, builder, config, plan, cache_bytes):
    if plan.get("plugins", True):
        config.set_preview_feature(getattr(trt.PreviewFeature, ALIASED_IO_FEATURE), True)
    for profile in plan["profiles"]:
        p = builder.create_optimization_profile()
        for name, s in profile["shapes"].items():
            p.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
        config.add_optimization_profile(p)
    if plan.get("portable"):
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
        if plan.get("hardware_compatibility"):
            config.hardware_compatibility_level = getattr(
                trt.HardwareCompatibilityLevel, plan["hardware_compatibility"])
    if plan.get("workspace_gb"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan["workspace_gb"] * (1 << 30)))
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    return cache


def build_engine(plan, onnx_path, engine_path, timing_cache_path=None, log=print):
    """Build and write the engine; returns the build report (a dict). A form with arx plugin
    nodes needs them registered first (kit_plugins.register, or arx.plugins.tensorrt); a
    plugin-free form (plan["plugins"] false) needs nothing but TensorRT."""
    trt = _import_tensorrt()
    t0 = time.time()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan))
    _parser = _parse(trt, network, logger, onnx_path)  # keep the parser alive while building
    config = builder.create_builder_config()
    cache_bytes = b""
    if timing_cache_path and os.path.isfile(timing_cache_path):
        with open(timing_cache_path, "rb") as f:
            cache_bytes = f.read()
    cache = _configure(trt, builder, config, plan, cache_bytes)
    config.progress_monitor = _make_progress(trt, log)
    serialized = builder.build_serialized_network(network, config)
    log("")
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    tmp = engine_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(bytes(serialized))
    os.replace(tmp, engine_path)  # never a half-written engine under the final name
    if timing_cache_path:
        with open(timing_cache_path + ".tmp", "wb") as f:
            f.write(bytes(cache.serialize()))
        os.replace(timing_cache_path + ".tmp", timing_cache_path)
    return {"tensorrt": trt.__version__, "engine": os.path.basename(engine_path),
            "engine_bytes": os.path.getsize(engine_path), "build_s": round(time.time() - t0, 1),
            "layers": network.num_layers, "profiles": [p["name"] for p in plan["profiles"]],
            "portable": bool(plan.get("portable")), "timing_cache_reused": bool(cache_bytes)}


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description="Build the TensorRT engine of an arx build kit.")
    ap.add_argument("--kit", default=here, help="kit folder (default: this script's folder)")
    ap.add_argument("--engine", help="engine file to write (default: KIT/decoder.engine)")
    ap.add_argument("--timing-cache", help="timing cache to reuse/update (default: KIT/timing.cache)")
    ap.add_argument("--no-check", action="store_true", help="skip the engine check (check_engine.py)")
    ap.add_argument("--force", action="store_true", help="keep an engine that fails the check")
    args = ap.parse_args(argv)
    with open(os.path.join(args.kit, "kit.json"), encoding="utf-8") as f:
        kit = json.load(f)
    plan = kit["build"]
    if plan.get("plugins", True):
        sys.path.insert(0, args.kit)
        import kit_plugins  # the kit's AOT plugin registrations (PTX for this device's SM)

        kit_plugins.register(os.path.join(args.kit, "plugins"))
    engine = os.path.abspath(args.engine or os.path.join(args.kit, plan["engine"]))
    report = build_engine(plan, os.path.join(args.kit, plan["onnx"]), engine,
                          args.timing_cache or os.path.join(args.kit, "timing.cache"))
    with open(os.path.join(args.kit, "build_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {report['engine']} ({report['engine_bytes'] / 1e6:.1f} MB) in {report['build_s']} s")
    if args.no_check or not kit.get("check"):
        return 0
    # in its own process, which registers the kit's plugins itself (twice here would clash)
    check = kit["check"]["argv"] + ["--engine", engine] + (["--force"] if args.force else [])
    return subprocess.call([sys.executable, *check], cwd=args.kit)


if __name__ == "__main__":
    sys.exit(main())
