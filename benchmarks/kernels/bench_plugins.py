#!/usr/bin/env python
"""Time the arx Triton kernels on a CUDA GPU and print a table (medians over runs).

    python benchmarks/kernels/bench_plugins.py            # needs CUDA, TRITON_INTERPRET unset

attention decode: achieved GB/s of KV read (2 * B * Hkv * past * D * bytes / time) next to the
card's copy bandwidth (a device-to-device torch copy of 1 GiB: read + write bytes / time).
sampling: latency at vocab 32k and 152k vs torch's own ops (softmax + topk + multinomial).
"""

from __future__ import annotations

import os
import statistics
import sys


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


def bench_attention(torch, rows, copy_gbs):
    from arx.plugins.attention.triton_kernel import kv_attention

    for b, hq, hkv, past, d in [(1, 32, 8, 4096, 128), (8, 32, 8, 4096, 128),
                                (1, 32, 8, 32768, 128), (16, 16, 16, 2048, 64)]:
        s_max = past + 1
        f = dict(dtype=torch.float16, device="cuda")
        q, kn, vn = (torch.randn(b, 1, h, d, **f) for h in (hq, hkv, hkv))
        kc, vc = (torch.randn(b, hkv, s_max, d, **f) for _ in range(2))
        past_len = torch.full((b,), past, dtype=torch.int32, device="cuda")
        new_len = torch.ones(b, dtype=torch.int32, device="cuda")
        ms = _median_ms(lambda: kv_attention(q, kn, vn, kc, vc, past_len, new_len), torch)
        gbs = 2 * b * hkv * past * d * 2 / ms / 1e6
        rows.append(("attention decode fp16", f"B={b} Hq={hq} Hkv={hkv} past={past} D={d}",
                     f"{ms * 1e3:.1f} us", f"{gbs:.0f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)"))


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


def main() -> int:
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
    bench_attention(torch, rows, copy_gbs)
    bench_sampling(torch, rows)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
