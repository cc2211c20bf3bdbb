"""Device build kits: everything a device needs to build its own engine, without arx.

    kits/<target>/
      decoder.trt.onnx(.data)   the TensorRT form (plugin nodes, static cache, sampler)
      plugins/<tag>.<sm>.ptx    AOT plugin kernels for the target's SM (+ .json launch params)
      kit_plugins.py            copy of arx/plugins/trt_contract.py: tensorrt.plugin
                                descriptors + AOT launch, reading that PTX
      build_engine.py           TensorRT Python build (profiles, timing cache, progress), then
                                runs the engine check (kit.json "check")
      check_engine.py           the engine vs ONNX Runtime's outputs (Polygraphy comparator)
      check_inputs.npz          the check's steps (feeds without the cache)
      check_reference.npz       ONNX Runtime's outputs on the bundle's decoder for those steps
      build_trtexec.sh          the same build with trtexec: plugin-free forms only (trtexec
                                cannot load Python plugins; see README)
      (a plugin-free form, --no-plugins, has no plugins/ and no kit_plugins.py)
      kit.json                  target, versions, IO, profiles, build plan, files
      vq_decoder.onnx, build_vq_decoder.sh   image-token bundles: the VQ decoder's own engine
                                (builder/image_kit.py; kit.json "stages" lists both)
      README.md                 minimum TensorRT/JetPack versions and how to run
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
from onnx import helper

from arx import __version__
from arx.manifest import Manifest
from arx.plugins import trt_contract

from .check import CHECK_SCRIPT, DECODE_STEPS, POLYGRAPHY, write_kit_check
from .form import FORM_FILE, TensorRTForm, save_form
from .options import BuildOptions
from .profiles import Profile, block_widths, make_profiles, merged_profile, trtexec_shapes
from .targets import PORTABLE_SM, Target

KIT_FORMAT = "arx-build-kit"
_TEXT_STEPS = (f"a ragged prefill and {DECODE_STEPS} decode steps against ONNX Runtime's outputs "
               f"on the bundle's own graph (check_reference.npz, made by arx): each output "
               f"(last_logits per step, every layer's cache after the last)")  # the kit's README
_HERE = Path(__file__).parent
# kit_plugins.py is a verbatim copy of the plugins' TensorRT contract (descriptors + AOT launch),
# as build_engine.py is of trt_build.py: arx and the kits register the very same code.
KIT_PLUGINS_SOURCE = Path(trt_contract.__file__)
_PLUGIN_DTYPES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16",
                  onnx.TensorProto.BFLOAT16: "bf16", onnx.TensorProto.INT8: "int8"}  # int8: caches


def build_plan(form: TensorRTForm, profiles: list[Profile], options: BuildOptions) -> dict:
    """What build_engine.py does (the same dict drives arx's own engine build)."""
    t = options.target_info
    return {"onnx": FORM_FILE, "engine": "decoder.engine",
            "profiles": [p.to_json() for p in profiles],
            "plugins": form.uses_plugins,
            "prefer_aot": options.plugin_impl == "aot", "aliased_io": True,
            "portable": options.portable,
            "hardware_compatibility": "AMPERE_PLUS" if options.portable and t.hardware_compat else None,
            "workspace_gb": options.workspace_gb}


def plugin_variants(form: TensorRTForm) -> list[tuple[str, dict]]:
    """(tag, spec) of every plugin kernel the form's nodes need; spec as trt_contract asks a
    KernelSource. Scale and window are runtime scalars: they never select a variant."""
    from arx.plugins.trt_contract import TACTICS, attention_tag, sample_tag

    inferred = onnx.shape_inference.infer_shapes(form.skeleton).graph
    types = {vi.name: vi.type.tensor_type for vi in (*inferred.value_info, *inferred.input, *inferred.output)}
    out = {}
    for n in (n for n in inferred.node if n.domain == "arx"):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        t = types[n.input[0]]
        dtype = _PLUGIN_DTYPES[t.elem_type]
        if n.op_type == "kv_attention":  # q (B, S, Hq, D); the cache's dtype picks the PTX too
            mask = attrs["mask"].decode() if isinstance(attrs["mask"], bytes) else attrs["mask"]
            cache = _PLUGIN_DTYPES[types[n.input[3]].elem_type]
            for phase in TACTICS.values():
                spec = dict(dtype=dtype, head_dim=t.shape.dim[3].dim_value, mask=mask, phase=phase,
                            cache=cache)
                out[attention_tag(**spec)] = dict(spec, op="kv_attention")
        elif n.op_type == "sample":
            spec = dict(dtype=dtype, guidance=bool(attrs.get("guidance", 0)))
            out[sample_tag(**spec)] = dict(spec, op="sample")
    return list(out.items())


def compile_plugin_ptx(form: TensorRTForm, sm: str, folder: Path, log=print) -> list[str]:
    """Compile the needed kernels for `sm` with the plugins' AOT API; returns written names."""
    from arx.plugins import aot
    from arx.plugins.attention.tensorrt_plugin import compile_attention
    from arx.plugins.sampling.tensorrt_plugin import compile_sample

    written = []
    for tag, spec in plugin_variants(form):
        compile_op = compile_attention if spec["op"] == "kv_attention" else compile_sample
        compiled = compile_op(spec, sm)
        written += [p.name for p in aot.write_variant(compiled, folder)]
        log(f"  PTX {tag} for {sm}")
    return written


def kit_manifest(manifest: Manifest, form: TensorRTForm, options: BuildOptions, sm: str,
                 profiles: list[Profile], files: list[str], engine_check: dict) -> dict:
    t: Target = options.target_info
    return {"format": KIT_FORMAT, "format_version": 1, "arx": __version__,
            "family": manifest.family, "target": t.to_json(), "plugin_sm": sm,
            "precision": options.precision, "max_batch": options.batch(),
            "max_seq_len": form.spec.s_max, "vocab_size": manifest.vocab_size,
            "requires": {"tensorrt": f">={t.trt_min}", "jetpack": t.jetpack_min},
            "io": form.stage.to_json(),
            "kv": {"layers": manifest.kv.layers, "kv_heads": manifest.kv.kv_heads,
                   "head_dim": manifest.kv.head_dim, "max_seq_len": form.spec.s_max,
                   "dtype": form.spec.cache_dtype,
                   "scales": "per_channel" if form.spec.cache_dtype == "int8" else "none",
                   "aliases": {q: p for p, q in manifest.kv.pairs()}},
            "tokenizer": {"eos_token_ids": list(manifest.tokenizer.eos_token_ids)},
            "build": build_plan(form, profiles, options), "check": engine_check,
            "files": sorted(files)}


def write_kit(folder: Path, bundle: Path, manifest: Manifest, form: TensorRTForm,
              options: BuildOptions, log=print) -> dict:
    """Fill `folder` (an empty, temporary folder: the caller renames it into place)."""
    t = options.target_info
    sm = PORTABLE_SM if options.portable else t.sm
    profiles = make_profiles(form.stage, options, form.spec.s_max, block_widths(manifest))
    files = save_form(form, folder)
    if form.uses_plugins:
        if options.ptx:
            files += [f"plugins/{n}" for n in compile_plugin_ptx(form, sm, folder / "plugins", log)]
        shutil.copyfile(KIT_PLUGINS_SOURCE, folder / "kit_plugins.py")
        files.append("kit_plugins.py")
    shutil.copyfile(_HERE / "trt_build.py", folder / "build_engine.py")
    shutil.copyfile(_HERE / "trt_check.py", folder / CHECK_SCRIPT)
    engine_check = write_kit_check(folder, bundle, manifest, form.stage.to_json(), form.spec.s_max,
                                   options.precision, form.uses_plugins)
    files += ["build_engine.py", *engine_check["files"], "build_trtexec.sh", "README.md", "kit.json"]
    stages = None
    if manifest.pipeline.kind == "image-tokens":  # the VQ decoder's engine (builder/image_kit.py)
        from .image_kit import write_image_stages

        more, stages = write_image_stages(folder, bundle, manifest, options)
        files += more
    elif manifest.pipeline.kind == "next-scale":  # VQ engine + ORT stages (builder/var_kit.py)
        from .var_check import describe
        from .var_kit import write_var_stages

        more, stages = write_var_stages(folder, bundle, manifest, options)
        files += more
        engine_check["steps"] = describe(manifest)
    kit = kit_manifest(manifest, form, options, sm, profiles, files, engine_check)
    if stages:
        from .image_form import check_codebook

        kit["stages"], kit["codebook"] = stages, check_codebook(manifest)
        kit["pipeline"] = manifest.pipeline.kind  # which stages note the README gives
    (folder / "build_trtexec.sh").write_text(trtexec_script(kit, merged_profile(profiles)))
    (folder / "build_trtexec.sh").chmod(0o755)
    (folder / "README.md").write_text(readme(kit, options))
    (folder / "kit.json").write_text(json.dumps(kit, indent=2) + "\n")
    return kit


def trtexec_script(kit: dict, profile: Profile) -> str:
    plan = kit["build"]
    flags = [f"--onnx={plan['onnx']}", f"--saveEngine={plan['engine']}",
             "--timingCacheFile=timing.cache",
             f"--minShapes={trtexec_shapes(profile, 0)}", f"--optShapes={trtexec_shapes(profile, 1)}",
             f"--maxShapes={trtexec_shapes(profile, 2)}"]
    if plan["portable"]:
        flags.append("--versionCompatible --excludeLeanRuntime")
        if plan["hardware_compatibility"]:
            flags.append("--hardwareCompatibilityLevel=ampere+")
    body = " \\\n    ".join(flags)
    head = f"""#!/usr/bin/env bash
# Build the engine with trtexec (TensorRT >= {kit['requires']['tensorrt'][2:]}), one optimization
# profile covering prefill and decode (opt = the decode shape). build_engine.py builds the two
# separate profiles and is the recommended path.
set -euo pipefail
cd "$(dirname "$0")"
"""
    if plan["plugins"]:  # refuse up front rather than fail inside the ONNX parser
        return head + """echo "this kit's TensorRT form uses the arx plugins, which are Python (tensorrt.plugin) and" \\
     "cannot be loaded by trtexec: run python3 build_engine.py, or make a plugin-free kit" \\
     "with: arx build BUNDLE --target TARGET --kit --no-plugins" >&2
exit 2
"""
    return head + f"trtexec {body} \"$@\"\n"


def readme(kit: dict, options: BuildOptions) -> str:
    t, req = kit["target"], kit["requires"]
    jetpack = f"- JetPack >= {req['jetpack']} (Jetson)\n" if req["jetpack"] else ""
    plugins = (f"arx plugin kernels compiled for {kit['plugin_sm']}" if kit["build"]["plugins"]
               else "no arx plugins (standard ONNX ops only)")
    trtexec_only = "" if kit["build"]["plugins"] else "; trtexec alone for build_trtexec.sh"
    return f"""# arx build kit: {kit['family']} for {t['name']} ({t['devices']}, {kit['plugin_sm']})

Precision {kit['precision']}, max batch {kit['max_batch']}, static KV cache of
{kit['max_seq_len']} tokens, {plugins}.

## Requirements
- TensorRT {req['tensorrt']}: its Python package (`import tensorrt`) for build_engine.py{trtexec_only}
- Polygraphy (`pip install polygraphy=={POLYGRAPHY}`: pure Python, no dependencies) and numpy
  for check_engine.py, which build_engine.py runs after the build (`--no-check`: TensorRT alone)
{jetpack}- a GPU of compute capability {t['compute_capability'][0]}.{t['compute_capability'][1]}

## Build
    python3 build_engine.py          # writes decoder.engine, timing.cache, build_report.json

then checks the engine (check_engine.py, the command line in kit.json "check"):
{kit['check'].get('steps', _TEXT_STEPS)}
within {kit['check']['tolerance']:g} of its largest value ({kit['precision']}). Over that,
the engine is renamed decoder.engine.rejected, the worst output is named and the errors go into
build_report.json "check"; `--force` keeps it, `--no-check` skips the check.
{_trtexec_note(kit)}{_stages_note(kit)}
## Engine IO (see kit.json "io")
- inputs: {", ".join(t["name"] for t in kit["io"]["inputs"] if not t["name"].startswith("past_key"))},
  and the KV cache past_key_values.i.key/value (B,kv_heads,S_max={kit['max_seq_len']},D).
  past_lengths (B,): tokens already in each row's cache; new_lengths (B,): valid tokens of each
  row of input_ids (right padding after).
- outputs: {", ".join(t["name"] for t in kit["io"]["outputs"] if not t["name"].startswith("present"))},
  and present.i.* (aliased: bind each to the same device address as its past_key_values.i.*
  input; the cache is written in place)
"""


def _stages_note(kit: dict) -> str:
    if not kit.get("stages"):
        return ""
    if kit.get("pipeline") == "next-scale":
        from .var_kit import STAGES_NOTE

        return STAGES_NOTE
    return ("\nAn image-token kit has a second engine, the VQ decoder (tokens -> pixels; no arx\n"
            "plugins): `./build_vq_decoder.sh` builds vq_decoder.engine with trtexec, one\n"
            "profile over the images of a batch (kit.json \"stages\"). The decoder engine's rows\n"
            "are [cond; null]: two cache rows per image.\n")


def _trtexec_note(kit: dict) -> str:
    if kit["build"]["plugins"]:
        return ("\nThe arx plugins are Python (`tensorrt.plugin`), so trtexec cannot build this form;\n"
                "`./build_trtexec.sh` says so. With the AOT plugins (the default) their kernels are\n"
                "inside the engine, so the built engine needs no Python to run. For a form trtexec\n"
                "builds directly: `arx build BUNDLE --target TARGET --kit --no-plugins`.\n")
    return ("    ./build_trtexec.sh               # the same with trtexec (one merged profile)\n\n"
            "This form has no arx plugin: attention is ONNX Attention + TensorScatter (TensorRT's\n"
            "IAttention + IKVCacheUpdateLayer), the token ids come from an ArgMax (greedy).\n")
