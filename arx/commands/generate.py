"""arx generate BUNDLE --prompt TEXT | --prompt-ids 1,2,3"""

from __future__ import annotations

import json
import sys

from arx.commands.generate_image import register_image_args, run_image, wants_image
from arx.errors import ArxError


def register(sub) -> None:
    p = sub.add_parser("generate", help="run the autoregressive loop on a bundle (streams text)")
    p.add_argument("bundle")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    src.add_argument("--prompt-ids", action="append", help="comma-separated token ids; repeat for a batch")
    src.add_argument("--class", dest="class_", type=int, action="append", metavar="N",
                     help="class label of an image-token bundle; repeat for several")
    p.add_argument("--max-new-tokens", metavar="N|context",
                   help="new tokens per prompt, or 'context' for as many as the context holds; "
                        "default: the bundle's generation default, stopping early (finish reason "
                        "length) where the context is full")
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    p.add_argument("--sample", action="store_true", help="sample (default: the model's generation config)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--no-eos-stop", action="store_true", help="generate max-new-tokens even after EOS")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--engine", metavar="TARGET",
                   help="run the TensorRT engine `arx build --target TARGET` made for this bundle "
                        "(needs TensorRT and a GPU) instead of the ONNX graph on ORT")
    p.add_argument("--draft", metavar="BUNDLE",
                   help="speculative decoding: a smaller bundle with the same tokenizer proposes "
                        "tokens the model verifies several at a time (same output: greedy "
                        "token for token, sampling in distribution)")
    p.add_argument("--lookup", type=int, metavar="N",
                   help="speculative decoding without a draft: propose what followed the last "
                        "N..1 tokens earlier in the prompt and text (prompt lookup; HF uses 2)")
    p.add_argument("--speculate", metavar="K|auto|jacobi[:W]",
                   help="tokens proposed per step with --draft/--lookup (default auto: from 4, "
                        "+2 after a step that kept all, -1 otherwise; at 0, plain steps for 8 "
                        "steps, then 1 again); image-token bundles: jacobi[:W], W guessed "
                        "tokens per image and step (default 8)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default: one per core)")
    p.add_argument("--no-spin", action="store_true",
                   help="idle threads sleep instead of spinning (better when cores are shared)")
    p.add_argument("--prepack", choices=("auto", "on", "off"), default="auto",
                   help="copy float weights into the GEMM layout at load: faster steps (2.5x "
                        "for 2+ rows, 7-20%% for one), a slower start and more memory (auto: off "
                        "for one prompt without speculation on float weights, where the start "
                        "dominates short generations; on otherwise: say on for long ones)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    register_image_args(p)
    p.set_defaults(run=run)


def _options(args, defaults):
    from arx.runtime.generate import GenerateOptions
    from arx.runtime.sampler import SamplingOptions

    if args.greedy and args.sample:
        raise ArxError("--greedy and --sample contradict each other; pick one")
    knobs = (args.temperature, args.top_k, args.top_p)
    do_sample = False if args.greedy else (True if args.sample or any(k is not None for k in knobs)
                                           else defaults.do_sample)
    pick = lambda v, d: d if v is None else v  # noqa: E731
    sampling = SamplingOptions(
        do_sample=do_sample,
        temperature=pick(args.temperature, defaults.temperature),
        top_k=pick(args.top_k, defaults.top_k),
        top_p=pick(args.top_p, defaults.top_p),
        repetition_penalty=pick(args.repetition_penalty, defaults.repetition_penalty),
        seed=args.seed)
    max_new, fit = _max_new_tokens(args.max_new_tokens, defaults.max_new_tokens)
    return GenerateOptions(max_new_tokens=max_new, fit_context=fit, sampling=sampling,
                           stop_on_eos=not args.no_eos_stop)


def _max_new_tokens(flag: str | None, default: int) -> tuple[int | None, bool]:
    """(max_new_tokens, fit_context): a number the user gives must fit the context (an error
    otherwise), the default is cut to it, "context" (None) is all of it."""
    if flag is None:
        return default, True
    if flag.strip().lower() == "context":
        return None, False
    try:
        return int(flag), False
    except ValueError:
        raise ArxError(f"--max-new-tokens takes a number or 'context', got {flag!r}") from None


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ArxError(f"--prompt-ids takes comma-separated integers, got {text!r}") from None


def run(args) -> int:
    from arx import needs
    from arx.manifest import read_manifest

    # image tokens speculate with Jacobi guesses (runtime/image_speculative.py), no proposer
    jacobi = (args.speculate or "").strip().lower().startswith("jacobi")
    spec = None if jacobi else _speculation(args)  # contradicting flags, before other checks
    needs.check("generate", args)  # --engine

    manifest = read_manifest(args.bundle)
    if manifest.pipeline.kind == "next-scale":  # VAR bundles (arx/commands/generate_var.py)
        from arx.commands.generate_var import run_var

        return run_var(args, manifest, _options, spec)
    if wants_image(args) or manifest.pipeline.kind == "image-tokens":
        if spec is not None:
            raise ArxError("--draft/--lookup speculate on text tokens; image-token bundles "
                           "speculate with --speculate jacobi[:W] (no draft model)")
        return run_image(args, manifest, _options)
    if jacobi:
        raise ArxError("--speculate jacobi is for image-token bundles; text speculates with "
                       "--draft BUNDLE or --lookup N (and --speculate K|auto)")
    return _run_text(args, manifest, spec)


def _run_text(args, manifest, spec) -> int:
    """Text generation: prompts in, the continuation streamed (one prompt with a tokenizer),
    printed per row, or as JSON; plain, speculative, or on an engine."""
    from arx.runtime.decoder import DecoderSession
    from arx.runtime.generate import generate

    options = _options(args, manifest.generation)
    tokenizer, prompts = _prompts(args, manifest)
    stream = None
    if not args.json and len(prompts) == 1 and tokenizer is not None:
        stream = _streamer(tokenizer)
        if args.prompt is not None:
            sys.stdout.write(args.prompt[0])  # the continuation reads on from the prompt
    if args.engine:
        result = _generate_on_engine(args, prompts, options, spec, stream)
    else:
        backend = text_backend(args, manifest, len(prompts))
        with DecoderSession(args.bundle, backend, manifest) as session:
            if spec is None:
                result = generate(session, prompts, options, on_token=stream)
            else:
                result = _generate_speculative(args, session, backend, prompts, options, spec,
                                               stream)
    _print_result(args, result, prompts, tokenizer, stream)
    _summary(result)
    return 0


def text_backend(args, manifest, rows: int = 1):
    """BackendOptions of a text generation from the flags. --prepack auto packs the weights
    unless every step but the prompt's is one row (one prompt, no speculation) over float
    weights: there the saved open (12 s at 1B) outweighs the 7-20% slower one-row steps for
    short generations, while a step of 2+ rows unpacked took 2.5x and quantized weights want
    their own layout (benchmarks/bench_prepack.py).
    `manifest` None (a draft bundle beside an engine): packed."""
    from arx.runtime.backend import BackendOptions

    one_row = rows == 1 and _speculation(args) is None
    float_weights = manifest is not None and "quantization" not in manifest.extensions
    prepack = {"on": True, "off": False}.get(args.prepack, not (one_row and float_weights))
    return BackendOptions(device=args.device, intra_op_threads=args.threads,
                          spin_wait=not args.no_spin, prepack=prepack)


def _prompts(args, manifest):
    """(the bundle's tokenizer or None, the prompts as token id lists)."""
    tokenizer = None
    if args.prompt is not None or manifest.tokenizer.file:
        from arx.runtime.tokenizer import Tokenizer

        if not manifest.tokenizer.file:
            raise ArxError(f"bundle {args.bundle} has no tokenizer; pass token ids with --prompt-ids")
        tokenizer = Tokenizer.from_bundle(args.bundle, manifest.tokenizer)
    prompts = ([tokenizer.encode(t) for t in args.prompt] if args.prompt is not None
               else [_parse_ids(t) for t in args.prompt_ids])
    return tokenizer, prompts


def _print_result(args, result, prompts, tokenizer, stream) -> None:
    if args.json:
        print(json.dumps(_as_json(result, prompts, tokenizer)))
    elif stream is not None:
        sys.stdout.write(stream.flush() + "\n")
        sys.stdout.flush()  # before the summary on stderr
    else:
        for i, toks in enumerate(result.tokens):
            body = tokenizer.decode(toks) if tokenizer else ",".join(map(str, toks))
            print(f"[{i}] {body}")


def _speculation(args):
    """SpeculativeOptions when --draft/--lookup ask for speculation, else None."""
    from arx.runtime.speculative import from_flags

    return from_flags(args.draft, args.lookup, args.speculate)


def _generate_speculative(args, session, backend, prompts, options, spec, stream):
    from arx.runtime.proposers import open_proposer
    from arx.runtime.speculative import generate_speculative

    with open_proposer(session.manifest, args.bundle, draft=args.draft, lookup=args.lookup,
                       backend_options=backend) as proposer:
        return generate_speculative(session, proposer, prompts, options, spec, on_token=stream)


def _generate_on_engine(args, prompts, options, spec, stream):
    from arx.runtime import engine_session
    from arx.runtime.generate import generate

    with engine_session.open_engine(args.bundle, args.engine) as session:
        if spec is None:
            return generate(session, prompts, options, on_token=stream)
        backend = text_backend(args, None)  # a draft bundle runs on ORT
        return _generate_speculative(args, session, backend, prompts, options, spec, stream)


def _streamer(tokenizer):
    decoder = tokenizer.stream()

    class Stream:
        def __call__(self, _seq: int, token: int) -> None:
            sys.stdout.write(decoder.push(token))
            sys.stdout.flush()

        def flush(self) -> str:
            return decoder.flush()

    return Stream()


def _as_json(result, prompts, tokenizer) -> dict:
    seqs = []
    for p, toks, reason in zip(prompts, result.tokens, result.finish_reasons):
        item = {"prompt_ids": p, "tokens": toks, "finish_reason": reason}
        if tokenizer is not None:
            item["text"] = tokenizer.decode(toks)
        seqs.append(item)
    out = {"sequences": seqs, "time_to_first_token_s": result.prefill_s,
           "decode_tokens_per_s": result.decode_tokens_per_s}
    if getattr(result, "speculation", None) is not None:
        out["speculation"] = result.speculation.to_json()
    return out


def _summary(result) -> None:
    n = sum(len(t) for t in result.tokens)
    print(f"[{n} tokens, finish {','.join(result.finish_reasons)}, "
          f"first after {result.prefill_s * 1e3:.0f} ms, "
          f"decode {result.decode_tokens_per_s:.1f} tokens/s{_speculation_summary(result)}]",
          file=sys.stderr)


def _speculation_summary(result) -> str:
    s = getattr(result, "speculation", None)
    if s is None:
        return ""
    return (f", {s.method}: {s.acceptance_rate:.0%} of {s.proposed} proposed kept, "
            f"{s.mean_accepted:.2f} per step, {s.tokens_per_target_step:.2f} tokens per "
            f"target step")
