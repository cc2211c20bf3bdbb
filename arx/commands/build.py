"""arx build BUNDLE --target T [--precision P] [--kit]"""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("build", help="build a TensorRT engine (or a device build kit) from a bundle",
                       description="Rewrite the decoder to its TensorRT form (fused attention and "
                                   "sampler plugins, static in-place KV cache) and build an engine "
                                   "when TensorRT and a GPU are here, or a self-contained build "
                                   "kit for the target device (--kit, or when they are absent).")
    p.add_argument("bundle", nargs="?", help="bundle folder (from arx export or arx calibrate)")
    p.add_argument("--target", help="device: a100, orin, l4, rtx4090, h100, h200, thor "
                   "(--list-targets shows the table)")
    p.add_argument("--list-targets", action="store_true", help="print the target table and exit")
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16", "int8"),
                   help="fp16/bf16 cast the graph (norms and logits stay fp32); int8 needs a "
                        "bundle from `arx calibrate --scheme w8a8` (default: fp16)")
    p.add_argument("--kit", action="store_true", help="write a build kit instead of an engine")
    p.add_argument("-o", "--output", type=Path, help="kit folder (default: BUNDLE/kits/TARGET)")
    p.add_argument("--max-batch", type=int, help="largest batch (default: the target's)")
    p.add_argument("--max-seq-len", type=int, help="static KV cache length (default: the bundle's)")
    p.add_argument("--opt-batch", type=int, help="batch the profiles are tuned for")
    p.add_argument("--opt-prompt-len", type=int, help="prompt length the prefill profile is tuned for")
    p.add_argument("--decode-tokens", type=int, default=1,
                   help="max new tokens per decode step (> 1 for speculative verification)")
    p.add_argument("--portable", action="store_true", help="version- and hardware-compatible "
                   "engine (sm_80 plugin PTX; Ampere or newer)")
    p.add_argument("--attention", default="plugin", choices=("plugin", "native"),
                   help="attention as the arx::kv_attention plugin (default) or as standard ONNX "
                        "Attention + TensorScatter that TensorRT builds natively")
    p.add_argument("--kv-dtype", choices=("fp16", "int8"),
                   help="the engine's KV cache (default: the bundle's --kv-dtype cache, else the "
                        "precision's); int8 takes the scales of arx calibrate --kv-dtype int8, "
                        "and a cache unlike the precision's needs --attention native")
    p.add_argument("--sampler", choices=("plugin", "argmax", "none"),
                   help="token ids from the arx::sample plugin (default: all sampling modes), a "
                        "native ArgMax (greedy), or none (return logits only; the default of "
                        "next-scale bundles)")
    p.add_argument("--no-plugins", action="store_true",
                   help="shorthand for --attention native --sampler argmax: an engine with no "
                        "arx plugin, which trtexec builds directly")
    p.add_argument("--logits", choices=("last", "all", "none", "verify"),
                   help="logits returned beside the token ids (default: last token; next-scale "
                        "bundles: all, every position of a scale); verify: no logits, every "
                        "position's greedy token, for greedy --draft/--lookup on the device")
    p.add_argument("--plugin-impl", default="aot", choices=("aot", "jit"),
                   help="plugin kernels: AOT PTX in the engine (default) or JIT Triton")
    p.add_argument("--no-ptx", action="store_true", help="kit without plugin PTX (no Triton here)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file to reuse")
    p.add_argument("--workspace-gb", type=float, help="builder workspace limit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing -o folder")
    p.add_argument("--force", action="store_true", help="keep an engine over the engine check's "
                   "tolerance (its errors against ONNX Runtime are recorded in the build report)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=run)


def run(args) -> int:
    from arx.builder.targets import targets_table
    from arx.errors import ArxError

    if args.list_targets:
        print(targets_table())
        return 0
    if not args.bundle or not args.target:
        raise ArxError("arx build needs a bundle and --target, e.g. "
                       "arx build model.arx --target h100 (see --list-targets)")
    from arx import needs
    from arx.builder.build import build_bundle
    from arx.builder.options import BuildOptions

    attention = "native" if args.no_plugins else args.attention
    sampler, logits = _head(args)
    needs.check("build", args, uses_plugins="plugin" in (attention, sampler))
    options = BuildOptions(
        target=args.target, precision=args.precision, max_batch=args.max_batch,
        max_seq_len=args.max_seq_len, opt_batch=args.opt_batch, opt_prompt_len=args.opt_prompt_len,
        decode_tokens=args.decode_tokens, kit=args.kit, output=args.output,
        portable=args.portable, attention=attention, sampler=sampler, logits=logits,
        plugin_impl=args.plugin_impl, ptx=not args.no_ptx, timing_cache=args.timing_cache,
        workspace_gb=args.workspace_gb, overwrite=args.overwrite, force=args.force,
        progress=not args.quiet, kv_dtype=args.kv_dtype)
    result = build_bundle(args.bundle, options)
    what = "engine" if result.kind == "engine" else "build kit"
    print(f"wrote {what} {result.path}")
    return 0


def _head(args) -> tuple[str, str]:
    """--sampler and --logits, defaulted by the bundle: a next-scale engine returns every
    position's logits for the host sampler (builder/tensorrt_form.py), any other samples."""
    from arx.manifest import read_manifest

    next_scale = read_manifest(args.bundle).pipeline.kind == "next-scale"
    sampler = args.sampler or ("none" if next_scale else "plugin")
    if args.no_plugins and sampler == "plugin":  # --no-plugins: no arx::sample either
        sampler = "argmax"
    return sampler, args.logits or ("all" if next_scale else "last")
