"""Train the target (~32M parameters) and the draft (~3.4M) that bench_speculative.py compares,
on the same text with one tokenizer, so a draft's acceptance is real, not random.

    python benchmarks/train_speculative.py --out /tmp/spec-models            # the real run
    python benchmarks/train_speculative.py --out /tmp/spec-smoke --smoke     # a minute: plumbing

Text: the default model's self-made stories (scripts/make_corpus.py) and the Python standard
library's own sources (code: what prompt lookup is for), mixed about half and half. Files are
taken in sorted order, every tenth file held out for the benchmark's prompts, so the run is
reproducible (seeded, same torch and thread count). Training reuses
scripts/train_default_model.py (tokenizer, packing, AdamW + warmup + cosine). Writes
OUT/{target,draft}/ (Hugging Face folders with the same tokenizer), OUT/{target,draft}.arx
(exported bundles), OUT/heldout_code.txt, OUT/heldout_stories.txt and OUT/train_metrics.json.

Cost, measured on the 2 shared vCPUs this was written on (2 threads, batch 8 x 256): the target
takes about 14 s a step, the draft about 1.7 s, so the defaults (1500 steps each, 3M tokens)
take about 6 h under load, less on a quiet machine. --target-steps/--draft-steps trade that
for acceptance.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from dataclasses import asdict, replace
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import make_corpus  # noqa: E402
import train_default_model as tdm  # noqa: E402

# (hidden, layers, heads, kv heads, intermediate): Llama shapes, head_dim 64 and 32
SHAPES = {"target": (512, 10, 8, 4, 1408), "draft": (256, 4, 8, 2, 576)}
SMOKE_SHAPES = {"target": (128, 2, 4, 2, 256), "draft": (64, 1, 4, 2, 128)}


def model_config(shape: tuple[int, ...], vocab: int):
    from transformers import LlamaConfig

    hidden, layers, heads, kv, inter = shape
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, max_position_embeddings=1024, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       tie_word_embeddings=True, bos_token_id=tdm.BOS_ID,
                       eos_token_id=tdm.EOS_ID, pad_token_id=tdm.PAD_ID)


def python_sources(n_chars: int) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: standard-library modules in sorted order, every tenth
    held out, until n_chars of training text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "test" not in p.parts and "idlelib" not in p.parts)
    train, held, size = [], [], 0
    for i, path in enumerate(files):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if i % 10 == 9:
            held.append(text)
        elif size < n_chars:
            train.append(text)
            size += len(text)
        if size >= n_chars and len(held) >= 20:
            break
    return train, held


def corpus(mb: float) -> tuple[list[str], list[str], list[str]]:
    """(training docs, held-out code, held-out stories), half stories, half code."""
    code, held_code = python_sources(int(mb * 5e5))
    stories = make_corpus.documents(make_corpus.TRAIN_SEED, int(mb * 5e5))
    held_stories = make_corpus.documents(make_corpus.EVAL_SEED, 200_000)
    return stories + code, held_code, held_stories


def train_one(name: str, shape, vocab: int, train_ids, eval_ids, opt: tdm.TrainOptions, out: Path,
              tokenizer) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(opt.seed)
    model = LlamaForCausalLM(model_config(shape, vocab))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n / 1e6:.2f}M parameters, {opt.steps} steps", flush=True)
    result = tdm.train(model, train_ids, eval_ids, opt)
    model.eval()
    tdm.save(out / name, model, tokenizer, {"options": asdict(opt), "parameters": n, **result})
    return {"parameters": n, **result}


def export_both(out: Path) -> None:
    from arx.export.exporter import ExportOptions, export_model

    for name in ("target", "draft"):
        export_model(source=out / name, output=out / f"{name}.arx",
                     options=ExportOptions(progress=False, overwrite=True))
        print(f"exported {out / name}.arx", flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target-steps", type=int, default=1500)
    ap.add_argument("--draft-steps", type=int, default=1500)
    ap.add_argument("--corpus-mb", type=float, default=16.0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 3 steps, 0.2 MB of text")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    mb = 0.2 if args.smoke else args.corpus_mb
    steps = {"target": 3, "draft": 3} if args.smoke else {"target": args.target_steps,
                                                          "draft": args.draft_steps}
    base = tdm.TrainOptions(batch=2 if args.smoke else args.batch,
                            seq_len=64 if args.smoke else args.seq_len, lr=1e-3,
                            vocab_size=args.vocab_size, threads=args.threads,
                            eval_every=500, eval_batches=2 if args.smoke else 8, steps=10)
    t0 = time.time()
    docs, held_code, held_stories = corpus(mb)
    tok = tdm.train_tokenizer(docs, args.vocab_size)
    ids = tdm.token_stream(tok, docs)
    eval_ids = tdm.token_stream(tok, held_code[:5] + held_stories[:50])
    tokenizer = tdm.hf_tokenizer(tok)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout_code.txt").write_text("\n\x00\n".join(held_code))
    (args.out / "heldout_stories.txt").write_text("\n".join(held_stories))
    metrics = {"corpus_tokens": len(ids), "vocab_size": args.vocab_size}
    for name, shape in shapes.items():
        opt = replace(base, steps=steps[name])
        metrics[name] = train_one(name, shape, args.vocab_size, ids, eval_ids, opt, args.out,
                                  tokenizer)
    export_both(args.out)
    metrics["seconds"] = time.time() - t0
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"done in {metrics['seconds'] / 60:.1f} min: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
