"""arx calibrate BUNDLE --data FILE --scheme w8a8|w8|w4 -o OUT"""

from __future__ import annotations

from pathlib import Path

from arx.errors import ArxError

SCHEME_NAMES = ("w8a8", "w8", "w4")  # mirrors arx.calibration.options.SCHEMES (kept light to import)
TEXT_COUNTS = (128, 32)  # --samples, --eval-samples of a text bundle


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="quantize a bundle (int8 / int4) behind an accuracy gate",
                       description="Quantize an fp32 bundle: w8a8 (explicit symmetric int8 Q/DQ, "
                                   "for TensorRT and ORT), w8 or w4 (weight-only, MatMulNBits on "
                                   "CPU). Measures perplexity, top-1 agreement and KL vs fp32 on "
                                   "held-out text and refuses to write a bundle over the gate.")
    p.add_argument("bundle", help="fp32 bundle made by arx export")
    p.add_argument("-o", "--output", help="quantized bundle to write (default: BUNDLE-SCHEME.arx)")
    p.add_argument("--scheme", default="w8a8", help=f"one of {', '.join(SCHEME_NAMES)} (default w8a8)")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="calibration text: .txt (one sample per line) or .jsonl; for a "
                                   "next-scale bundle, class ids (one per line) of the images it "
                                   "draws (default: every class in turn)")
    d.add_argument("--random", action="store_true", help="random token ids instead of text (marked in the report)")
    d.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    d.add_argument("--chunk", action="store_true", help="tokenize the whole file and cut it into --seq-len chunks")
    d.add_argument("--samples", type=int,
                   help="calibration samples (default 128; a next-scale bundle: 32 images it draws)")
    d.add_argument("--seq-len", type=int, default=128, help="tokens per sample, at most (default 128)")
    d.add_argument("--eval-data", help="held-out text for the accuracy report (default: the tail of --data)")
    d.add_argument("--eval-samples", type=int,
                   help="held-out samples (default 32; a next-scale bundle: 16 images)")
    d.add_argument("--seed", type=int, default=0, help="seed for --random")
    q = p.add_argument_group("quantization")
    q.add_argument("--method", default="minmax", help="w8a8 activation ranges: minmax, entropy or percentile")
    q.add_argument("--percentile", type=float, default=99.999, help="for --method percentile (default 99.999)")
    q.add_argument("--smoothquant", type=float, metavar="ALPHA", help="w8a8: SmoothQuant with this alpha (0.5 typical)")
    q.add_argument("--group-size", type=int, default=128, help="w8/w4 block size along K: 16, 32, 64, 128 (default) or 256")
    q.add_argument("--accuracy-level", type=int,
                   help="w8/w4 MatMulNBits compute: 4 quantizes activations to int8 per block, the "
                        "fast kernel (default); 1 computes in fp32, activations stay float")
    q.add_argument("--reduce-range", default="auto", choices=("auto", "on", "off"),
                   help="w8a8: int8 weights in 7 bits, so onnxruntime's int8 MatMul does not "
                        "saturate on x86 CPUs without VNNI; auto (default): on where this host's does")
    q.add_argument("--keep-fp", default="", metavar="LAYER,...",
                   help="MatMuls kept in float: names (layers.3.mlp.down_proj, lm_head) or prefixes (layers.3)")
    q.add_argument("--lm-head", choices=["quantize", "float"],
                   help="quantize the output projection (default: float for w8a8, quantize for w8/w4)")
    q.add_argument("--embedding", choices=["quantize", "float"],
                   help="the token embedding table (w4, w8): quantize (the default) reads a tied "
                        "LM head's codes, else gets int4 codes of its own at w4 (an untied w8 "
                        "table stays float); float keeps it fp32")
    q.add_argument("--kv-dtype", default="fp32", choices=("fp32", "fp16", "int8"),
                   help="KV cache of the output: fp16, or int8 with per-channel scales measured "
                        "on --data (default fp32); the gate covers weights and cache together")
    q.add_argument("--calibration-cache", metavar="FILE",
                   help="w8a8: reuse the ranges of this calibration.json (or bundle) instead of calibrating")
    g = p.add_argument_group("gate and output")
    g.add_argument("--max-ppl-increase", metavar="PERCENT",
                   help="largest allowed perplexity increase in percent (default 2 for w8 schemes, 10 for w4)")
    g.add_argument("--force", action="store_true", help="write the bundle even when it fails the gate")
    g.add_argument("--no-plot", action="store_true", help="skip reports/accuracy.png")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output bundle")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=run)


def _percent(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text.strip().rstrip("%")) / 100.0
    except ValueError:
        raise ArxError(f"--max-ppl-increase takes a percentage like 2 or 2%, got {text!r}") from None


def quantize_choice(flag: str | None) -> bool | None:
    """--lm-head / --embedding: None (the scheme's default), or whether to quantize."""
    return None if flag is None else flag == "quantize"


def options_from_args(args):
    """Map the flags onto the frozen option dataclasses (validation happens there)."""
    from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions

    keep = tuple(k.strip() for k in args.keep_fp.split(",") if k.strip())
    quant = QuantOptions(scheme=args.scheme, method=args.method, percentile=args.percentile,
                         smoothquant=args.smoothquant, group_size=args.group_size,
                         accuracy_level=args.accuracy_level, keep_fp=keep,
                         reduce_range=args.reduce_range,
                         quantize_lm_head=quantize_choice(args.lm_head),
                         quantize_embedding=quantize_choice(args.embedding))
    samples, eval_samples = _counts(args)
    data = DataOptions(path=args.data, random=args.random, text_field=args.text_field, chunk=args.chunk,
                       samples=samples, seq_len=args.seq_len, eval_path=args.eval_data,
                       eval_samples=eval_samples, seed=args.seed)
    return CalibrateOptions(quant=quant, data=data, max_ppl_increase=_percent(args.max_ppl_increase),
                            force=args.force, calibration_cache=args.calibration_cache,
                            kv_dtype=args.kv_dtype,
                            overwrite=args.overwrite, progress=not args.quiet, plot=not args.no_plot)


def _counts(args) -> tuple[int, int]:
    """--samples and --eval-samples, defaulted by what the bundle is (text or next-scale)."""
    if args.samples is not None and args.eval_samples is not None:
        return args.samples, args.eval_samples
    calib, evals = TEXT_COUNTS
    try:
        from arx.manifest import read_manifest

        if read_manifest(Path(args.bundle)).pipeline.kind == "next-scale":
            from arx.calibration.next_scale import DEFAULT_EVAL_IMAGES, DEFAULT_IMAGES

            calib, evals = DEFAULT_IMAGES, DEFAULT_EVAL_IMAGES
    except ArxError:
        pass  # calibrate_bundle says what is wrong with the bundle
    return (calib if args.samples is None else args.samples,
            evals if args.eval_samples is None else args.eval_samples)


def run(args) -> int:
    from arx import needs

    needs.check("calibrate", args)  # --scheme w8/w4, the accuracy plot: before calibrating
    from arx.calibration.calibrator import calibrate_bundle

    options = options_from_args(args)
    src = Path(args.bundle)
    out = Path(args.output) if args.output else src.with_name(f"{src.name.removesuffix('.arx')}-{args.scheme}.arx")
    result = calibrate_bundle(bundle=src, output=out, options=options)
    print(result.table)
    verdict = "passed" if result.report.passed else "FAILED (written because of --force)"
    print(f"wrote {out} ({args.scheme}, gate {verdict}; report in {out}/reports/)")
    return 0
