"""`arx build`: bundle -> TensorRT form -> engine (TensorRT + GPU here) or a device build kit.

    read manifest ─► TensorRT form (graph pass, precision, ONNX checks)
                       ├─ engine: engines/<target>/decoder.engine + build_report.json
                       └─ kit:    kits/<target>/ (or -o DIR), when asked or when TensorRT/GPU are absent
                     ─► manifest.builds[<target>] records what was made, with the engine IO

Engines and kits inside the bundle are derived files: a new build for the same target replaces
them (atomically: temp folder, then rename). A kit written elsewhere (-o) needs --overwrite to
replace an existing folder.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from arx.bundle import atomic_bundle
from arx.manifest import MANIFEST_NAME, Manifest, read_manifest
from arx.progress import Steps

from .engine import ENGINE_FILE, REPORT_FILE, build_engine_files, engine_unavailable_reason
from .form import make_tensorrt_form
from .kit import write_kit
from .options import BuildOptions


@dataclass(frozen=True)
class BuildResult:
    kind: str  # "engine" | "kit"
    path: Path
    note: str | None = None  # why a kit was made instead of an engine
    check: dict | None = None  # the engine check's report (engines only)


def build_bundle(bundle: str | Path, options: BuildOptions) -> BuildResult:
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    log = partial(print, file=sys.stderr, flush=True) if options.progress else (lambda *a, **k: None)
    reason = None if options.kit else engine_unavailable_reason()
    if reason:
        log(f"arx: {reason}: writing a build kit for {options.target} instead")
    steps = Steps(2, enabled=options.progress)
    with steps.step(f"TensorRT form ({options.precision}, {options.target})"):
        form = make_tensorrt_form(bundle, manifest, options)
    t = options.target_info
    if options.kit or reason:
        out = Path(options.output) if options.output else bundle / "kits" / t.name
        inside = out.resolve().is_relative_to(bundle.resolve())
        if inside:
            out.parent.mkdir(parents=True, exist_ok=True)
        with steps.step(f"build kit -> {out}"), \
                atomic_bundle(out, overwrite=options.overwrite or inside) as tmp:
            write_kit(tmp, bundle, manifest, form, options, log=log)
        result = BuildResult("kit", out, reason)
    else:
        out = bundle / "engines" / t.name
        out.parent.mkdir(exist_ok=True)
        cache = options.timing_cache or bundle / "engines" / f"timing.{t.name}.cache"
        with steps.step(f"engine -> {out / ENGINE_FILE}"), atomic_bundle(out, overwrite=True) as tmp:
            report = build_engine_files(tmp, form, options, cache, bundle, manifest, log=log)
            report["aliases"] = {present: past for past, present in manifest.kv.pairs()}
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        result = BuildResult("engine", out, check=report["check"])
    _record(bundle, manifest, options, result, form.stage.to_json())
    return result


def _record(bundle: Path, manifest: Manifest, options: BuildOptions, result: BuildResult,
            io: dict) -> None:
    """Note the build and its engine IO in the manifest (written atomically: temp file, then
    rename): the engine runtime derives its feeds from here, as the ORT runtime does from the
    decoder stage."""
    builds = dict(manifest.builds)
    try:
        where = str(result.path.resolve().relative_to(bundle.resolve()))
    except ValueError:
        where = str(result.path.resolve())
    builds[options.target_info.name] = {
        "kind": result.kind, "path": where, "precision": options.precision,
        "max_batch": options.batch(), "max_seq_len": options.max_seq_len or manifest.kv.max_seq_len,
        "portable": options.portable, "io": io, "check": result.check,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    manifest.builds = builds
    tmp = bundle / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, bundle / MANIFEST_NAME)
