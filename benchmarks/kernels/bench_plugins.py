#!/usr/bin/env python
"""Time the arx Triton kernels on a CUDA GPU and print a table (medians over runs).

    python benchmarks/kernels/bench_plugins.py            # needs CUDA, TRITON_INTERPRET unset
    python benchmarks/kernels/bench_plugins.py --caches fp16/fp16 fp16/int8 --no-sampling

attention decode: achieved GB/s of KV read (2 * B * Hkv * past * D * bytes of the cache dtype /
time) next to the card's copy bandwidth (a device-to-device torch copy of 1 GiB: read + write
bytes / time), per activation/cache pair (--caches, trt_contract.CACHE_COMBOS: an fp16 cache in
fp32/bf16 engines, int8 in any); an int8 cache reads half the bytes of fp16, so the same GB/s
is twice the tokens/s.
sampling: latency at vocab 32k and 152k vs torch's own ops (softmax + topk + multinomial).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

_TORCH = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}
DEFAULT_CACHES = ("fp16/fp16", "fp16/int8", "bf16/int8", "fp32/fp16")


def _median_ms(fn, torch, warmup=5, runs=50) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(torch) -> float:
    """GB/s of a device-to-device copy (bytes read + written)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), torch, runs=20)
    return 2 * src.numel() / ms / 1e6


def parse_caches(values) -> list[tuple[str, str]]:
    """'act/cache' strings -> pairs; ValueError naming the pairs for one the plugin lacks."""
    from arx.plugins.trt_contract import CACHE_COMBOS

    pairs = []
    for v in values:
        pair = tuple(v.split("/"))
        if pair not in CACHE_COMBOS:
            raise ValueError(f"--caches {v!r} is not an activation/cache pair of "
                             f"arx::kv_attention; give some of "
                             f"{' '.join('/'.join(c) for c in CACHE_COMBOS)}")
        pairs.append(pair)
    return pairs


def _cache(torch, shape, cache: str):
    """A random cache in `cache`'s dtype (int8: codes over the full range) and its scales."""
    if cache != "int8":
        return torch.randn(*shape, dtype=getattr(torch, _TORCH[cache]), device="cuda"), None
    codes = torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda")
    return codes, torch.full((shape[1], 1, shape[3]), 0.02, dtype=torch.float32, device="cuda")


def bench_attention(torch, rows, copy_gbs, caches):
    from arx.plugins.attention.triton_kernel import kv_attention

    for act, cache in caches:
        for b, hq, hkv, past, d in [(1, 32, 8, 4096, 128), (8, 32, 8, 4096, 128),
                                    (1, 32, 8, 32768, 128), (16, 16, 16, 2048, 64)]:
            s_max = past + 1
            f = dict(dtype=getattr(torch, _TORCH[act]), device="cuda")
            q, kn, vn = (torch.randn(b, 1, h, d, **f) for h in (hq, hkv, hkv))
            (kc, ks), (vc, vs) = (_cache(torch, (b, hkv, s_max, d), cache) for _ in range(2))
            past_len = torch.full((b,), past, dtype=torch.int32, device="cuda")
            new_len = torch.ones(b, dtype=torch.int32, device="cuda")
            ms = _median_ms(lambda: kv_attention(q, kn, vn, kc, vc, past_len, new_len,
                                                 k_scale=ks, v_scale=vs), torch)
            gbs = 2 * b * hkv * past * d * kc.element_size() / ms / 1e6
            rows.append((f"attention decode {act}, {cache} cache",
                         f"B={b} Hq={hq} Hkv={hkv} past={past} D={d}", f"{ms * 1e3:.1f} us",
                         f"{gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)"))


def bench_sampling(torch, rows):
    from arx.plugins.sampling.reference import SamplingParams
    from arx.plugins.sampling.triton_kernel import sample

    for vocab in (32_000, 152_064):
        for b in (1, 8):
            logits = torch.randn(b, vocab, device="cuda")
            presence = torch.zeros(b, vocab, dtype=torch.bool, device="cuda")
            seed = torch.arange(b, dtype=torch.int64, device="cuda")
            offset = torch.zeros(b, dtype=torch.int64, device="cuda")
            for name, p in [("greedy", SamplingParams(0.0)), ("temp", SamplingParams(0.8)),
                            ("top-k 50 + top-p 0.9", SamplingParams(0.8, 50, 0.9))]:
                params = torch.from_numpy(SamplingParams.table([p] * b)).cuda()
                ms = _median_ms(lambda: sample(logits, params, presence, seed, offset), torch)
                rows.append((f"sample {name}", f"B={b} V={vocab}", f"{ms * 1e3:.1f} us", "arx"))

            def torch_topk_sample():
                vals, idx = torch.topk(logits / 0.8, 50, dim=-1)
                probs = torch.softmax(vals, dim=-1)
                return idx.gather(-1, torch.multinomial(probs, 1))

            ms = _median_ms(torch_topk_sample, torch)
            rows.append(("torch topk+softmax+multinomial", f"B={b} V={vocab}",
                         f"{ms * 1e3:.1f} us", "torch"))
            ms = _median_ms(lambda: torch.argmax(logits, dim=-1), torch)
            rows.append(("torch argmax", f"B={b} V={vocab}", f"{ms * 1e3:.1f} us", "torch"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--caches", nargs="+", default=list(DEFAULT_CACHES), metavar="ACT/CACHE",
                    help="activation/cache dtype pairs of the attention rows (default: "
                         f"{' '.join(DEFAULT_CACHES)})")
    ap.add_argument("--no-sampling", action="store_true", help="skip the sampler rows")
    args = ap.parse_args(argv)
    try:
        args.caches = parse_caches(args.caches)
    except ValueError as e:
        print(f"bench_plugins: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)  # bad flags are refused before torch or CUDA is looked at
    try:
        import torch
    except ImportError:
        print("bench_plugins needs torch with CUDA: pip install 'arx[export,kernels]'",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        print("bench_plugins needs a CUDA GPU (and TRITON_INTERPRET unset); nothing was timed",
              file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth(torch)
    rows = [("device-to-device copy", torch.cuda.get_device_name(), "", f"{copy_gbs:.0f} GB/s")]
    bench_attention(torch, rows, copy_gbs, args.caches)
    if not args.no_sampling:
        bench_sampling(torch, rows)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
