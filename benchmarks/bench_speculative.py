"""Speculative decoding speed: arx with a draft and with prompt lookup against arx plain greedy,
Hugging Face `generate` with `assistant_model` and `prompt_lookup_num_tokens`, and
onnxruntime-genai's n-gram speculation, on the same weights (benchmarks/train_speculative.py).

    python benchmarks/train_speculative.py --out /tmp/spec-models          # once (~6 h, 2 cores)
    python benchmarks/bench_speculative.py --models /tmp/spec-models --runs 5 --json /tmp/spec.json
    python benchmarks/bench_speculative.py --models /tmp/spec-smoke --runs 1 --new-tokens 32

Batch 1, greedy, EOS disabled, `--prompt-len` prompt tokens then `--new-tokens` new ones, per
prompt: "code" (a held-out standard-library function, then a line asking for it again and its
first lines: lookup has the rest to find) and "story" (held-out stories: little to look up).
Each run times every engine once, in turn (interleaved, after one warm-up each); the table
shows medians. Time is taken as tokens reach the caller (decode_engines.py's rule: decode
tokens/s = (N - 1) / (last token - first token)), every token of a chunk that assisted
generation delivers at once stamped with the chunk's time. The table marks whether each
engine's greedy tokens equal arx plain's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_engines  # noqa: E402
from decode_engines import RunTiming, _timing  # noqa: E402

SEPARATOR = "\n\n# The same code again, unchanged:\n"
GOALS = [("code", "arx+draft", "arx", 1.8), ("code", "arx+lookup", "arx", 1.8),
         ("story", "arx+draft", "arx", 0.95), ("story", "arx+lookup", "arx", 0.95),
         ("code", "arx+draft", "hf+assistant", 1.0), ("code", "arx+lookup", "hf+lookup", 1.0),
         ("code", "arx+lookup", "ort-genai+ngram", 1.0)]


class ArxSpeculative(decode_engines.ArxEngine):
    """arx's speculative loop: a draft bundle or prompt lookup, k adaptive (--speculate auto)."""

    def __init__(self, bundle: Path, threads: int, *, draft: Path | None = None,
                 lookup: int | None = None):
        super().__init__(bundle, threads)
        from arx.manifest import read_manifest
        from arx.runtime.backend import BackendOptions
        from arx.runtime.decoder import DecoderSession
        from arx.runtime.proposers import (DraftProposer, LookupProposer, check_same_tokenizer,
                                           draft_backend_options)

        self.draft_session = None
        if draft is not None:
            check_same_tokenizer(self.session.manifest, bundle, read_manifest(draft), draft)
            self.draft_session = DecoderSession(draft, draft_backend_options(
                BackendOptions(device="cpu", intra_op_threads=threads)))
            self.proposer = DraftProposer(self.draft_session)  # per-run state lives in start()
        else:
            eos = tuple(self.session.manifest.tokenizer.eos_token_ids)
            self.proposer = LookupProposer(lookup, eos)
        self.stats: dict = {}

    def run(self, prompt: list[int], new_tokens: int) -> RunTiming:
        from arx.runtime.generate import GenerateOptions
        from arx.runtime.speculative import SpeculativeOptions, generate_speculative

        stamps: list[float] = []
        opts = GenerateOptions(max_new_tokens=new_tokens, stop_on_eos=False)
        t0 = time.perf_counter()
        result = generate_speculative(self.session, self.proposer, [prompt], opts,
                                      SpeculativeOptions(adaptive=True),
                                      on_token=lambda _b, _t: stamps.append(time.perf_counter()))
        self.stats = result.speculation.to_json()
        return _timing(t0, stamps, result.tokens[0])

    def close(self) -> None:
        super().close()
        if self.draft_session is not None:
            self.draft_session.backend.close()


class HfGenerate(decode_engines.HfEngine):
    """Hugging Face `generate` greedy (eager attention), with extra arguments: an
    assistant_model folder (loaded here), or prompt_lookup_num_tokens."""

    def __init__(self, folder: Path, threads: int, **extra):
        super().__init__(folder, threads)
        if "assistant_model" in extra:
            from transformers import AutoModelForCausalLM

            extra["assistant_model"] = AutoModelForCausalLM.from_pretrained(
                extra["assistant_model"], dtype=self.torch.float32,
                attn_implementation="eager").eval()
        self.extra = extra


class OrtGenaiSpeculative(decode_engines.OrtGenaiEngine):
    """onnxruntime-genai 0.18's Generator with set_speculative_options (n-gram lookup);
    tokens per call vary, so the sequence's length is what is stamped."""

    def __init__(self, folder: Path, threads: int, **speculative):
        super().__init__(folder, threads)
        self.speculative = speculative

    def run(self, prompt: list[int], new_tokens: int) -> RunTiming:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(prompt) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        if self.speculative:
            params.set_speculative_options(**self.speculative)
        gen = og.Generator(self.model, params)
        stamps: list[float] = []
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray([prompt], dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
            have = len(gen.get_sequence(0)) - len(prompt)
            stamps.extend([time.perf_counter()] * (have - len(stamps)))
        tokens = [int(t) for t in gen.get_sequence(0)[len(prompt):]]
        return _timing(t0, stamps, tokens)


def factories(models: Path, threads: int, log: Path) -> dict:
    """Engine name -> a function that loads it (the same target weights in every one)."""
    import bench_models

    target, bundle = models / "target", models / "target.arx"

    def ort_genai(**spec):
        vocab = json.loads((target / "config.json").read_text())["vocab_size"]
        return OrtGenaiSpeculative(bench_models.ort_genai_folder(target, vocab, "fp32", log),
                                   threads, **spec)

    return {
        "arx": lambda: decode_engines.ArxEngine(bundle, threads),
        "arx+draft": lambda: ArxSpeculative(bundle, threads, draft=models / "draft.arx"),
        "arx+lookup": lambda: ArxSpeculative(bundle, threads, lookup=2),
        "hf": lambda: HfGenerate(target, threads),
        "hf+assistant": lambda: HfGenerate(target, threads, assistant_model=models / "draft"),
        "hf+lookup": lambda: HfGenerate(target, threads, prompt_lookup_num_tokens=10),
        "ort-genai": lambda: ort_genai(),
        "ort-genai+ngram": lambda: ort_genai(ngram_size=2, max_draft_tokens=8),
    }


def measure(loaded: dict, prompt: list[int], new_tokens: int, runs: int) -> dict:
    """Per engine: its timings over `runs` interleaved runs (after one warm-up each)."""
    out = {name: {"runs": []} for name in loaded}
    for name, engine in loaded.items():
        engine.run(prompt, new_tokens)
    for _ in range(runs):
        for name, engine in loaded.items():
            t = engine.run(prompt, new_tokens)
            out[name]["runs"].append({"ttft_s": t.ttft_s, "tps": t.decode_tokens_per_s})
            out[name]["tokens"] = t.tokens
            if getattr(engine, "stats", None):
                out[name]["speculation"] = engine.stats
    for row in out.values():
        tps = [r["tps"] for r in row["runs"]]
        row.update(tps=statistics.median(tps), tps_min=min(tps), tps_max=max(tps),
                   ttft_ms=1e3 * statistics.median(r["ttft_s"] for r in row["runs"]))
    return out


def prompts(models: Path, prompt_len: int, tokenizer) -> dict[str, list[int]]:
    """The code prompt (a function, a line asking for it again, its first tokens) and the story
    prompt, each exactly prompt_len tokens."""
    code = (models / "heldout_code.txt").read_text().split("\n\x00\n")
    start = next(t for t in code if "\ndef " in t)
    src = start[start.index("\ndef ") + 1:]
    ids = tokenizer.encode(src)[1:]  # without <s>
    sep = tokenizer.encode(SEPARATOR)[1:]
    head = (prompt_len - 1 - len(sep)) * 2 // 3  # the function's first tokens, then again
    code_ids = [1] + ids[:head] + sep + ids[: prompt_len - 1 - head - len(sep)]
    story = tokenizer.encode((models / "heldout_stories.txt").read_text())[:prompt_len]
    assert len(code_ids) == len(story) == prompt_len, (len(code_ids), len(story))
    return {"code": code_ids, "story": story}


def ratios(results: dict) -> list[dict]:
    rows = []
    for prompt, a, b, goal in GOALS:
        r = results.get(prompt, {})
        if a in r and b in r and r[b]["tps"]:
            x = r[a]["tps"] / r[b]["tps"]
            rows.append({"prompt": prompt, "ratio": f"{a} / {b}", "measured": x, "goal": goal,
                         "met": x >= goal})
    return rows


def format_table(report: dict) -> str:
    lines = ["| prompt | engine | TTFT ms | decode tokens/s | runs min-max | acceptance | "
             "tokens per target step | tokens = arx plain |", "|---|---|---|---|---|---|---|---|"]
    for prompt, rows in report["results"].items():
        plain = rows.get("arx", {}).get("tokens")
        for name, r in rows.items():
            s = r.get("speculation") or {}
            acc = f"{s['acceptance_rate']:.0%}" if s else ""
            tps = f"{s['tokens_per_target_step']:.2f}" if s else ""
            same = "" if plain is None else ("yes" if r["tokens"] == plain else "NO")
            lines.append(f"| {prompt} | {name} | {r['ttft_ms']:.1f} | {r['tps']:.1f} | "
                         f"{r['tps_min']:.1f}-{r['tps_max']:.1f} | {acc} | {tps} | {same} |")
    lines += ["", "| prompt | ratio (decode tokens/s) | measured | goal |", "|---|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['ratio']} | {r['measured']:.2f}x | >= {r['goal']}x |"
              for r in report["ratios"]]
    lines += [f"- {name}: {why}" for name, why in report["failed"].items()]
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, required=True, help="train_speculative.py's --out")
    p.add_argument("--engines", default="arx,arx+draft,arx+lookup,hf,hf+assistant,hf+lookup,"
                                        "ort-genai,ort-genai+ngram")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.models / "target")
    make = factories(args.models, args.threads, args.models / "bench_speculative.log")
    loaded, failed = {}, {}
    for name in args.engines.split(","):
        try:
            loaded[name] = make[name]()
        except Exception as e:  # noqa: BLE001 - a peer that does not run here is reported
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    results = {}
    for pname, prompt in prompts(args.models, args.prompt_len, tokenizer).items():
        results[pname] = measure(loaded, prompt, args.new_tokens, args.runs)
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "results": results,
              "ratios": ratios(results), "failed": failed}
    for engine in loaded.values():
        engine.close()
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
