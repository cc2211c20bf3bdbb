"""arx export SOURCE -o BUNDLE"""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export", help="export a Hugging Face folder or model.pt to a bundle",
                       description="Export a checkpoint to an arx bundle: decoder.onnx with the KV "
                                   "cache as state, the tokenizer, and a parity check vs PyTorch.")
    p.add_argument("source", help="Hugging Face checkpoint folder or a torch.save'd model.pt")
    p.add_argument("-o", "--output", help="bundle folder to write (default: SOURCE name + .arx)")
    p.add_argument("--max-seq-len", type=int, help="context length the cache is built for "
                   "(default: the model's, at most 4096)")
    p.add_argument("--atol", type=float, help="parity tolerance on logits (default: per family)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check (not advised)")
    p.add_argument("--inputs-embeds", action="store_true",
                   help="the decoder takes inputs_embeds (B, S, hidden) instead of input_ids, with "
                        "an embedder stage for token ids (models fed other embeddings)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="the decoder's weights, activations and cache: fp32 (ORT on the CPU, the "
                        "default), fp16 (CPU and GPU), bf16 (CUDA and TensorRT only)")
    p.add_argument("--moe", choices=("op", "dense"),
                   help="mixture-of-experts layers: op (onnxruntime's MoE node, runs the chosen "
                        "experts only; the default where it fits) or dense (standard ops, every "
                        "expert)")
    p.add_argument("--kv-dtype", default="fp32", choices=("fp32", "fp16", "int8"),
                   help="KV cache dtype: fp16 halves it, int8 quarters it (static per-channel "
                        "scales from random ids here; arx calibrate --kv-dtype int8 measures "
                        "them on text behind the accuracy gate). Default fp32")
    q = p.add_argument_group("direct quantized export (the bundle arx calibrate makes, no float "
                             "bundle on the way)")
    q.add_argument("--quantize", choices=("w8", "w4", "w8a8"),
                   help="quantize each linear's weights as they are emitted, as arx calibrate "
                        "--scheme w8|w4 does, then gate its accuracy against the unquantized "
                        "model (w8a8 needs arx calibrate)")
    q.add_argument("--group-size", type=int, default=128,
                   help="weight block size along K (default 128), as arx calibrate's")
    q.add_argument("--embedding", choices=("quantize", "float"),
                   help="the token embedding table: quantize (the default: the tied head's "
                        "codes, or int4 of its own at w4) or float, as arx calibrate's --embedding")
    q.add_argument("--data", help="text for the accuracy report and gate (.txt, one sample a "
                                  "line, or .jsonl); default: random token ids, flagged as such")
    q.add_argument("--eval-samples", type=int,
                   help="sequences the accuracy gate compares on (default 32, as arx calibrate's)")
    q.add_argument("--force", action="store_true",
                   help="write the quantized bundle even when it fails the accuracy gate")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output bundle")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=run)


def run(args) -> int:
    from arx import needs

    needs.check("export", args)  # before torch is imported: one line naming the extra
    from arx.export.exporter import BUNDLE_DTYPES, ExportOptions, export_model

    out = Path(args.output) if args.output else Path(Path(args.source).stem + ".arx")
    options = ExportOptions(max_seq_len=args.max_seq_len, atol=args.atol,
                            inputs_embeds=args.inputs_embeds, dtype=BUNDLE_DTYPES[args.dtype],
                            kv_dtype=args.kv_dtype, moe=args.moe,
                            check_parity=not args.no_parity, overwrite=args.overwrite,
                            progress=not args.quiet, quantize=_quantize(args))
    manifest = export_model(source=args.source, output=out, options=options)
    parity = manifest.parity.get("outputs", {})
    worst = max((v["max_abs"] for v in parity.values()), default=None)
    note = f", parity max abs err {worst:.2e}" if worst is not None else ""
    accuracy = manifest.extensions.get("quantization", {}).get("accuracy")
    if accuracy:  # the report's line; the per-layer analysis is arx calibrate's
        from arx.calibration.report import percent

        note += (f", {args.quantize} perplexity {accuracy['ppl_increase']:+.2%} vs the "
                 f"unquantized model (gate {percent(accuracy['gate'])}"
                 f"{'' if accuracy['passed'] else ': FAILED, written because of --force'}), top-1 "
                 f"{accuracy['top1_agreement']:.1%}; reports/accuracy.json")
    print(f"wrote {out} ({manifest.family}, {manifest.model.get('parameters', 0) / 1e6:.1f}M "
          f"parameters, context {manifest.kv.max_seq_len}{note})")
    return 0


def _quantize(args):
    """--quantize as arx calibrate's options (its defaults: scheme table, gate, data split)."""
    if args.quantize is None:
        for flag, given in (("--group-size", args.group_size != 128), ("--data", args.data),
                            ("--eval-samples", args.eval_samples is not None),
                            ("--force", args.force), ("--embedding", args.embedding)):
            if given:
                from arx.errors import ArxError

                raise ArxError(f"{flag} is an option of --quantize: add --quantize w4|w8 or "
                               f"drop {flag}")
        return None
    from arx.calibration.options import CalibrateOptions, DataOptions, QuantOptions
    from arx.commands.calibrate import quantize_choice

    return CalibrateOptions(quant=QuantOptions(scheme=args.quantize, group_size=args.group_size,
                                               quantize_embedding=quantize_choice(args.embedding)),
                            data=DataOptions(path=args.data, random=not args.data,
                                             **({} if args.eval_samples is None
                                                else {"eval_samples": args.eval_samples})),
                            force=args.force, overwrite=args.overwrite,
                            progress=not args.quiet, plot=False)
