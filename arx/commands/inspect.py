"""arx inspect BUNDLE"""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show what a bundle holds: stages, IO, KV layout, parity")
    p.add_argument("bundle", nargs="?")
    p.add_argument("--env", action="store_true", help="show the onnxruntime build and providers "
                   "arx runs on and which extras are installed (no bundle needed)")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from arx.errors import ArxError
    from arx.manifest import read_manifest

    if args.env:
        return _env(args.json)
    if not args.bundle:
        raise ArxError("arx inspect needs a bundle (arx inspect model.arx), or --env to show "
                       "the environment")
    m = read_manifest(args.bundle)
    if args.json:
        print(json.dumps(m.to_json(), indent=2))
        return 0
    info = m.model
    print(f"bundle     {args.bundle}")
    print(f"family     {m.family} ({info.get('architecture', '?')}, "
          f"{info.get('parameters', 0) / 1e6:.2f}M parameters, {info.get('dtype', '?')})")
    p = m.pipeline
    spaces = ", ".join(f"{k} ({t.kind}, {t.size})" for k, t in m.token_spaces.items())
    via = f" (via {p.embed})" if p.embed else ""
    print(f"pipeline   {p.kind}: loop {p.loop} samples {p.samples} -> {p.token_space} ids -> "
          f"{p.feedback}{via}{''.join(f'; then {t.stage}' for t in p.then)}; token spaces {spaces}")
    t = m.tokenizer
    print(f"tokenizer  {t.file or 'none (use --prompt-ids)'}"
          f"{', ' + t.onnx_file if t.onnx_file else ''}; bos {t.bos_token_id}, "
          f"eos {list(t.eos_token_ids)}, vocab {m.vocab_size}")
    if t.file and not t.onnx_file and t.onnx_skipped_reason:
        print(f"           no tokenizer.onnx: {t.onnx_skipped_reason}")
    for caveat in t.onnx_caveats:
        print(f"           tokenizer.onnx caveat: {caveat}")
    for name, stage in m.stages.items():
        print(f"stage      {name}: {stage.file}"
              f"{f' (ids: {stage.token_space})' if stage.token_space else ''}")
        if stage.kv is not None:
            kv = stage.kv
            print(f"  kv cache {kv.layers} layers x (key, value) (B, {kv.kv_heads}, "
                  f"S<={kv.max_seq_len}, {kv.head_dim}) {kv.dtype}, update {kv.update}"
                  + (f", {kv.scales} scales" if kv.scales != "none" else ""))
        for kind, specs in (("in ", stage.inputs), ("out", stage.outputs)):
            for s in _collapse(specs):
                print(f"  {kind} {s}")
    quant = m.extensions.get("quantization")
    depth = (m.parity or {}).get("depth")  # a truncated check (big or --quantize exports)
    _print_parity(m.parity, f"first {depth['layers']} of {depth['of']} layers in {depth['dtype']}"
                  if depth else "of the fp32 source" if quant else "")
    if quant:
        _print_quantization(quant)
    for target, b in m.builds.items():
        print(f"build      {target}: {b.get('kind')} {b.get('path')} ({b.get('precision')}, "
              f"batch <= {b.get('max_batch')}, S_max {b.get('max_seq_len')})")
    for key, value in m.extensions.items():
        if key != "quantization":
            print(f"{key:<10} {json.dumps(value)[:200]}")
    return 0


def _env(as_json: bool) -> int:
    from arx.environment import environment, format_environment

    env = environment()
    print(json.dumps(env, indent=2) if as_json else "\n".join(format_environment(env)))
    return 0


def _print_quantization(q: dict) -> None:
    print(f"quantized  {q.get('scheme')}: {q.get('summary', '')}")
    embedding = q.get("embedding")  # weight-only bundles: the token table's form
    if embedding is not None:
        print("  token embedding " + (f"int{embedding['bits']} ({embedding['format']}, codes "
                                      f"{embedding.get('codes', 'own')})"
                                      if isinstance(embedding, dict) else "float"))
    acc = q.get("accuracy") or {}
    if acc:
        gate = "passed" if acc.get("passed") else ("FORCED past" if acc.get("forced") else "failed")
        print(f"  perplexity {acc['ppl_fp32']:.3f} -> {acc['ppl_quantized']:.3f} "
              f"({acc['ppl_increase'] * 100:+.2f}%, gate {acc['gate'] * 100:g}% {gate}), "
              f"top-1 agreement {acc['top1_agreement'] * 100:.1f}%, KL {acc['kl_mean']:.4f} "
              f"on {acc['tokens']} held-out tokens")


def _collapse(specs) -> list[str]:
    """Print per-layer KV tensors once, as a pattern."""
    lines, seen = [], set()
    for s in specs:
        pattern = ".".join("{i}" if part.isdigit() else part for part in s.name.split("."))
        if pattern in seen:
            continue
        seen.add(pattern)
        shape = ", ".join(str(d) for d in s.shape)
        lines.append(f"{pattern:<28} {s.dtype:<8} ({shape})")
    return lines


def _print_parity(parity: dict, note: str = "") -> None:
    if not parity:
        print("parity     not recorded")
        return
    if parity.get("passed") is None:
        print(f"parity     skipped ({parity.get('skipped', '')})")
        return
    status = "passed" if parity["passed"] else "FAILED"
    note = f" ({note})" if note else ""
    print(f"parity     {status}{note} vs PyTorch, atol {parity['atol']:g}, batch {parity['batch']} "
          f"(prompts {parity['prompt_lengths']}), {parity['decode_steps']} decode steps")
    for k, v in parity.get("outputs", {}).items():
        print(f"  {k:<16} max abs {v['max_abs']:.2e}  max rel {v['max_rel']:.2e}")
