"""The memory roofline of a decode step, and the machine facts it needs.

A decode step of a small-batch LLM is memory bound: it must stream every weight once and the
KV cache of every sequence up to its current length; compute is a few FLOPs per byte. So

    bound (s/step) = (weight bytes read + KV bytes read) / memory bandwidth

and `measured / bound` says how much of the step is not the unavoidable memory traffic
(kernel overhead, threads waiting, Python between steps). Bytes read per step:
  weights: every initializer, except tables only Gathered from (the token embedding), of which
           a step reads one row per sequence;
  KV:      2 (K and V) x layers x batch x kv_heads x length x head_dim x dtype size, at the
           step's past length; averaged over the generation (prompt .. prompt + gen - 1).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from arx.manifest import KVLayout, Manifest

# bytes per element of ONNX TensorProto data types (4-bit types: 0.5)
# a table only these read streams one row a token (w4's embedding: int4 codes and scales)
GATHER_READERS = {"Gather", "GatherBlockQuantized", "GatherBlockQuantized:2"}
_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
                  16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: 0.5, 22: 0.5, 23: 0.5}


def weight_bytes(bundle: Path, manifest: Manifest) -> dict:
    """{"total", "per_step", "gather_only", "method"}: initializer bytes of the decoder graph.

    `per_step` counts what one decode step of batch 1 streams (Gather-only tables excluded;
    the few rows a step reads are added per batch in Roofline). Reads the graph structure with
    `onnx` without loading external data; where `onnx` is absent (a minimal edge install) it
    falls back to the file sizes and says so.
    """
    path = bundle / manifest.decoder.file
    try:
        import onnx
    except ImportError:
        size = path.stat().st_size + sum(p.stat().st_size for p in bundle.glob(path.name + ".data*"))
        return {"total": size, "per_step": size, "gather_only": {}, "method": "file sizes (no onnx)"}
    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in sizes:
                consumers.setdefault(name, set()).add(node.op_type if i == 0 else f"{node.op_type}:{i}")
    gather_only = {}
    for name, ops in consumers.items():
        if ops <= GATHER_READERS:
            t = next(t for t in model.graph.initializer if t.name == name)
            row = sizes[name] / max(int(t.dims[0]), 1) if t.dims else sizes[name]
            gather_only[name] = {"bytes": sizes[name], "row_bytes": row}
    total = sum(sizes.values())
    per_step = total - sum(g["bytes"] for g in gather_only.values())
    return {"total": int(total), "per_step": int(per_step), "gather_only": gather_only,
            "method": "onnx initializers"}


def _tensor_bytes(t) -> float:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * _ONNX_ITEMSIZE.get(t.data_type, 4)


def kv_bytes(kv: KVLayout, batch: int, length: float) -> float:
    """Bytes of K and V of all layers for `batch` sequences of `length` tokens."""
    itemsize = np.dtype(kv.dtype).itemsize
    return 2 * kv.layers * batch * kv.kv_heads * length * kv.head_dim * itemsize


@dataclass(frozen=True)
class Roofline:
    weight_bytes: float
    kv_bytes: float
    mean_kv_length: float
    bandwidth: float  # bytes/s

    @classmethod
    def for_decode(cls, weights: dict, kv: KVLayout, prompt_len: int, gen_len: int, batch: int,
                   bandwidth: float) -> "Roofline":
        rows = sum(g["row_bytes"] for g in weights["gather_only"].values()) * batch
        mean_len = prompt_len + (gen_len - 2) / 2  # past length over the gen_len - 1 decode steps
        return cls(weights["per_step"] + rows, kv_bytes(kv, batch, mean_len), mean_len, bandwidth)

    @property
    def bound_ms(self) -> float:
        return (self.weight_bytes + self.kv_bytes) / self.bandwidth * 1e3

    def to_json(self, measured_ms: float) -> dict:
        return {"weight_mb": self.weight_bytes / 2**20, "kv_mb": self.kv_bytes / 2**20,
                "mean_kv_length": self.mean_kv_length, "bandwidth_gb_s": self.bandwidth / 1e9,
                "bound_ms": self.bound_ms, "measured_ms": measured_ms,
                "percent_of_roofline": 100.0 * self.bound_ms / measured_ms if measured_ms else 0.0}


def memory_bandwidth(threads: int = 0, mib: int = 256, repeats: int = 7) -> dict:
    """DRAM bandwidth of this machine, measured with numpy on a `mib` MiB array (far larger
    than any CPU cache), split over `threads` threads (numpy releases the GIL):

      read:  an OR-reduction over the array as uint64 (bytes read / time): streaming weights;
      copy:  np.copyto into a second array (bytes read + written / time), for reference.

    `repeats` timings after one warm-up; the median and the best are reported. The roofline
    divides by the best read: a roofline is an upper bound, and a busy machine only ever makes
    a timing slower (the median is kept to show how noisy the machine was)."""
    threads = threads or len(os.sched_getaffinity(0))
    n = mib * 2**20 // 8
    src = np.ones(n, dtype=np.uint64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    spans = list(zip(bounds[:-1], bounds[1:]))

    def timed(fn) -> list[float]:
        times = []
        with ThreadPoolExecutor(threads) as pool:
            for i in range(repeats + 1):
                t = time.perf_counter()
                list(pool.map(fn, spans))
                if i:
                    times.append(time.perf_counter() - t)
        return times

    read = timed(lambda s: np.bitwise_or.reduce(src[s[0]:s[1]]))
    copy = timed(lambda s: np.copyto(dst[s[0]:s[1]], src[s[0]:s[1]]))
    return {"bytes_per_s": src.nbytes / min(read), "read_median_bytes_per_s": src.nbytes / statistics.median(read),
            "copy_bytes_per_s": 2 * src.nbytes / min(copy), "threads": threads, "array_mib": mib,
            "method": f"numpy read of {mib} MiB, best of {repeats}"}


# --- peak memory ------------------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process in bytes: VmHWM from /proc/self/status (since the
    last reset_peak_rss), else getrusage's lifetime maximum."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
