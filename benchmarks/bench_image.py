"""Text-to-image speed: arx (ONNX Runtime) against transformers eager on the same Janus weights.

    python benchmarks/bench_image.py                    # ~100M-parameter random Janus, 16x16 grid
    python benchmarks/bench_image.py --shape tiny --runs 1   # the smoke run (tests/benchmarks)

A random JanusForConditionalGeneration (Llama LM of about 100M parameters, a 16x16 token grid,
a small VQ decoder) is saved, exported with `arx export`, then both sides draw greedy images with
CFG (scale 5) for batch 1 and 4, the median of --runs runs each. Reported per engine and batch:
seconds per image, image tokens/s, and where the time goes: the token loop (prefill + decoder
steps, each step the 2B-row CFG batch) and the VQ decoder. Greedy, so both sides draw the same
tokens (checked), which keeps the comparison on the same work. The bundle `arx calibrate
--random --scheme w4` makes of it (--scheme, repeatable; --no-quantized: none) is timed beside
it, with its gate's numbers and the share of its greedy tokens equal to fp32's.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_bench_args import calibrated, parse_image_bench, scheme_flags, schemes  # noqa: E402

# (hidden, layers, heads, kv heads, intermediate, text vocab, codebook, grid side, VQ base, mult)
SHAPES = {"100m": (768, 12, 12, 4, 2048, 32000, 4096, 16, 64, [1, 1, 2, 2]),
          "tiny": (64, 2, 4, 2, 128, 100, 32, 4, 32, [1, 2])}
PROMPT = [1, *range(10, 40), 98]  # BOS, 30 text tokens, BOI
BOS, PAD, EOS, BOI = 1, 2, 3, 98


def janus_config(hidden, layers, heads, kv, inter, vocab, codebook, side, base, mult):
    """A JanusConfig of these dims (SHAPES' order); tests/janus_models.py builds its tiny ones
    with it too. The vision encoder (image understanding) is minimal: image mode never runs it."""
    from transformers import JanusConfig

    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=vocab, hidden_size=hidden,
                         intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=1024, bos_token_id=BOS, pad_token_id=PAD,
                         eos_token_id=EOS),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=side * 16, patch_size=16, projection_dim=hidden,
                           num_image_tokens=side * side, intermediate_size=64),
        vq_config=dict(embed_dim=8, num_embeddings=codebook, latent_channels=base,
                       base_channels=base, channel_multiplier=mult, num_res_blocks=1,
                       projection_dim=hidden, image_token_embed_dim=hidden),
        image_token_id=99)


def janus_model(dims, seed: int = 0):
    """A random JanusForConditionalGeneration with the generation config image mode reads."""
    import torch
    from transformers import GenerationConfig, JanusForConditionalGeneration

    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(janus_config(*dims)).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS, pad_token_id=PAD,
                                               eos_token_id=EOS, guidance_scale=5.0,
                                               generation_kwargs={"boi_token_id": BOI})
    return model


def time_hf(model, batch: int, cfg: float) -> dict:
    import torch

    ids = torch.tensor([PROMPT] * batch)
    t0 = time.perf_counter()
    with torch.no_grad():
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                do_sample=False, guidance_scale=cfg)
        t1 = time.perf_counter()
        model.decode_image_tokens(tokens)
    return {"tokens": tokens.numpy(), "loop_s": t1 - t0, "vq_s": time.perf_counter() - t1}


class ArxRunner:
    """The bundle's decoder session and VQ decoder, opened once (as a server would keep them;
    `arx generate` also opens the VQ session per call, about 0.1 s not counted here)."""

    def __init__(self, bundle: Path, threads: int):
        from arx.manifest import read_manifest
        from arx.runtime.backend import BackendOptions, OrtBackend
        from arx.runtime.decoder import DecoderSession
        from arx.runtime.image_generate import image_info

        backend = BackendOptions(intra_op_threads=threads)
        self.manifest = read_manifest(bundle)
        self.session = DecoderSession(bundle, backend, self.manifest)
        self.vq_stage = self.manifest.stages[image_info(self.manifest).vq_stage]
        self.vq = OrtBackend(bundle / self.vq_stage.file, options=backend)

    def close(self) -> None:
        self.session.__exit__(None, None, None)
        self.vq.close()

    def time(self, batch: int, cfg: float) -> dict:
        from arx.runtime.image_generate import ImageOptions
        from arx.runtime.janus_generate import generate_images_from_prompts
        from arx.runtime.sampler import SamplingOptions

        options = ImageOptions(cfg_scale=cfg, sampling=SamplingOptions(do_sample=False))
        r = generate_images_from_prompts(self.session, [PROMPT] * batch, options)
        t = time.perf_counter()
        self.vq.run({self.vq_stage.inputs[0].name: r.tokens.reshape(batch, -1)})
        return {"tokens": r.tokens.reshape(batch, -1), "loop_s": r.tokens_s,
                "vq_s": time.perf_counter() - t, "steps_s": sum(r.step_s)}


def _median(runs: list[dict], batch: int, n: int) -> dict:
    loop = statistics.median(r["loop_s"] for r in runs)
    vq = statistics.median(r["vq_s"] for r in runs)
    return {"seconds_per_image": (loop + vq) / batch, "image_tokens_per_s": batch * n / loop,
            "token_loop_s": loop, "vq_decoder_s": vq}


def parse(argv):
    return parse_image_bench(argv, __doc__.splitlines()[0], SHAPES, batches="1 and 4",
                             runs=5, cfg=5.0, extra=scheme_flags("w4", "random token sequences"))


def _calibrate(bundle: Path, scheme: str, samples: int, n: int) -> tuple[Path, dict]:
    """The scheme's bundle, calibrated on random image-token sequences of a grid's length
    (`arx calibrate --random`: the session embeds them through the bundle's image_embed stage,
    as generation feeds its tokens back)."""
    from arx.calibration.options import DataOptions

    return calibrated(bundle, scheme, DataOptions(random=True, samples=samples, seq_len=n,
                                                  eval_samples=max(2, samples // 2)))


def _quantized(row: dict, runners: dict, batch: int, args, n: int, fp_tokens) -> None:
    """The row's columns for each calibrated bundle: per image, its speedup over eager, the
    share of its greedy tokens equal to the fp32 bundle's and its gate's numbers."""
    for scheme, (runner, acc) in runners.items():
        runs = [runner.time(batch, args.cfg) for _ in range(args.runs)]
        timed = _median(runs, batch, n)
        row[f"arx_{scheme}"] = timed
        row[f"speedup_{scheme}"] = (row["hf_eager"]["seconds_per_image"]
                                    / timed["seconds_per_image"])
        row[f"{scheme}_greedy_token_agreement"] = float((runs[0]["tokens"] == fp_tokens).mean())
        row[f"{scheme}_ppl_increase"] = acc["ppl_increase"]
        row[f"{scheme}_top1_agreement"] = acc["top1_agreement"]


def _row(args, model, runner, runners, batch: int, n: int) -> dict:
    hf = [time_hf(model, batch, args.cfg) for _ in range(args.runs)]
    ours = [runner.time(batch, args.cfg) for _ in range(args.runs)]
    row = {"shape": args.shape, "batch": batch,
           "tokens_equal": bool((hf[0]["tokens"] == ours[0]["tokens"]).all()),
           "arx": _median(ours, batch, n), "hf_eager": _median(hf, batch, n),
           "arx_decoder_steps_s": statistics.median(r["steps_s"] for r in ours)}
    row["speedup_per_image"] = row["hf_eager"]["seconds_per_image"] / row["arx"]["seconds_per_image"]
    _quantized(row, runners, batch, args, n, ours[0]["tokens"])
    return row


def main(argv=None) -> int:
    import torch

    from arx.export.exporter import ExportOptions, export_model

    args = parse(argv)
    torch.set_num_threads(args.threads)
    model = janus_model(SHAPES[args.shape])
    n = SHAPES[args.shape][7] ** 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "janus")
        bundle = Path(tmp) / "janus.arx"
        export_model(source=Path(tmp) / "janus", output=bundle,
                     options=ExportOptions(progress=False, max_seq_len=len(PROMPT) + n))
        runner = ArxRunner(bundle, args.threads)
        runners = {}
        try:
            for scheme in schemes(args, "w4"):
                qbundle, acc = _calibrate(bundle, scheme, args.calib_samples, n)
                runners[scheme] = (ArxRunner(qbundle, args.threads), acc)
            for batch in args.batch or [1, 4]:
                rows.append(_row(args, model, runner, runners, batch, n))
                _print(rows[-1])
        finally:
            for r in [runner, *(r for r, _ in runners.values())]:
                r.close()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def _print(row: dict) -> None:
    a, h = row["arx"], row["hf_eager"]
    print(f"{row['shape']} batch {row['batch']}: arx {a['seconds_per_image']:.3f} s/image "
          f"({a['image_tokens_per_s']:.0f} tok/s; loop {a['token_loop_s']:.3f} s of which decoder "
          f"steps {row['arx_decoder_steps_s']:.3f} s, VQ {a['vq_decoder_s']:.3f} s) | HF eager "
          f"{h['seconds_per_image']:.3f} s/image ({h['image_tokens_per_s']:.0f} tok/s; loop "
          f"{h['token_loop_s']:.3f} s, VQ {h['vq_decoder_s']:.3f} s) | "
          f"{row['speedup_per_image']:.2f}x, tokens equal: {row['tokens_equal']}")
    for key in (k for k in row if k.startswith("speedup_") and k != "speedup_per_image"):
        scheme = key.removeprefix("speedup_")
        q = row[f"arx_{scheme}"]
        print(f"  arx {scheme}: {q['seconds_per_image']:.3f} s/image ({q['image_tokens_per_s']:.0f}"
              f" tok/s) | {row[key]:.2f}x eager | greedy tokens equal to fp32's: "
              f"{row[f'{scheme}_greedy_token_agreement']:.1%} | gate: perplexity "
              f"{row[f'{scheme}_ppl_increase']:+.2%}, top-1 {row[f'{scheme}_top1_agreement']:.1%}")


if __name__ == "__main__":
    sys.exit(main())
