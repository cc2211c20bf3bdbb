"""What one weight costs the fp16 emitter: bf16 bits -> float32 (in, out) -> float16.

    python benchmarks/bench_weight_copies.py               # 12 weights of 8192 x 2048, 5 rounds

The variants, alternated round by round:
- torch: widen, transpose and cast, each copy a new torch tensor (what
  export/tensor_source.py did before 2026-12-02);
- numpy: the same three copies, each into a new numpy array (`into_numpy`: numpy asks the
  kernel for huge pages on big arrays, torch's allocator does not; what the emitter did until
  2026-12-04), the transpose in one torch copy_;
- emitter: what the emitter does now, widening and transposing in one copy
  (`tensor_source.transposed_float32`, in slabs of 256 source rows), then the cast
  (`external_data.to_proto_array`);
- reused: the three copies into buffers allocated once (the ceiling for a buffer pool).
On the 2-core VMs here, page faults on fresh memory cost more than the copies themselves
(docs/design.md, "Streamed export"). Prints each variant's median and spread over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from arx.export.external_data import to_proto_array  # noqa: E402
from arx.export.tensor_source import (bf16_tensor, transposed_float32,  # noqa: E402
                                      widen_bf16)


def torch_copies(bits: np.ndarray, _buffers) -> np.ndarray:
    wide = bf16_tensor(bits).float().numpy()
    moved = torch.from_numpy(wide.T).contiguous().numpy()
    return torch.from_numpy(moved).to(torch.float16).numpy()


def numpy_copies(bits: np.ndarray, _buffers) -> np.ndarray:
    """Widening, then a one-call transposing copy into numpy arrays, then the writer's cast."""
    wide = widen_bf16(bits)
    moved = np.empty(wide.T.shape, np.float32)
    torch.from_numpy(moved).copy_(torch.from_numpy(wide).t())
    return to_proto_array(moved, "float16")[0]


def emitter_copies(bits: np.ndarray, _buffers) -> np.ndarray:
    """The emitter's path: widened and transposed in one copy, then the writer's cast."""
    return to_proto_array(transposed_float32(bits), "float16")[0]


def reused_copies(bits: np.ndarray, buffers) -> np.ndarray:
    wide, moved, half = buffers
    torch.from_numpy(wide).copy_(bf16_tensor(bits))
    torch.from_numpy(moved).copy_(torch.from_numpy(wide.T))
    torch.from_numpy(half).copy_(torch.from_numpy(moved))
    return half


VARIANTS = {"torch": torch_copies, "numpy": numpy_copies, "emitter": emitter_copies,
            "reused": reused_copies}


def bench(rows: int, cols: int, weights: int, rounds: int) -> dict[str, list[float]]:
    buffers = (np.empty((rows, cols), np.float32), np.empty((cols, rows), np.float32),
               np.empty((cols, rows), np.float16))
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    expected = None
    for _ in range(rounds):
        for name, copies in VARIANTS.items():
            start = time.perf_counter()
            for i in range(weights):
                bits = np.full((rows, cols), 0x3F80 + i, np.uint16)  # the read's new array
                out = copies(bits, buffers)
            times[name].append(time.perf_counter() - start)
            expected = out.copy() if expected is None else expected
            if not np.array_equal(out, expected):
                raise SystemExit(f"{name}: the copies differ from the torch variant's")
            del out
    return times


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--weights", type=int, default=12, help="weights per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    times = bench(args.rows, args.cols, args.weights, args.rounds)
    print(f"{args.weights} weights of {args.rows} x {args.cols} a round, {args.rounds} rounds")
    for name, runs in times.items():
        print(f"  {name:7s} median {statistics.median(runs):6.3f} s  "
              f"(min {min(runs):.3f}, max {max(runs):.3f})")
    return times


if __name__ == "__main__":
    main()
