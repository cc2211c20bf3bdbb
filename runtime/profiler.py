"""`arx profile`: where a bundle's time goes, measured on this machine.

    for each (prompt length, batch):
        warm-up generations (not counted) ─► timed generations ─► TTFT, per-step decode latency
    one traced generation per (prompt length, batch) ─► backend's own per-op profiler
    bundle initializers + KV cache bytes ÷ measured memory bandwidth ─► roofline

Latency: TTFT is the prefill plus choosing the first token (`GenerationResult.prefill_s`);
decode latency is one decode step of the whole batch (`step_s`), so a token of every sequence
costs one step. p50/p90/p99 are over the steps of one run, then the median over runs.

Per-op time comes from a backend profiler (`OpProfiler`): ORT's trace on the CPU/CUDA EPs. It
runs in its own session, because tracing slows every node down; the timed runs never trace.

With `engine` set (`arx profile --engine TARGET`) the timed generations run the TensorRT engine
`arx build` made (runtime/engine_session.py) instead of the ONNX graph; TTFT and decode latency
mean the same. No per-op breakdown (TensorRT's IProfiler is not wired) and no roofline (the
bandwidth measured is the host's) are reported for engines.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from arx.errors import ArxError
from arx.manifest import Manifest, read_manifest
from arx.runtime.backend import BackendOptions
from arx.runtime.decoder import DecoderSession
from arx.runtime.generate import GenerateOptions, GenerationResult, generate
from arx.runtime.roofline import Roofline, memory_bandwidth, peak_rss, reset_peak_rss, weight_bytes
from arx.runtime.sampler import SamplingOptions

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class ProfileOptions:
    prompt_lens: tuple[int, ...] = (128,)
    gen_len: int = 128
    batches: tuple[int, ...] = (1,)
    runs: int = 5
    warmup: int = 1
    device: str = "cpu"
    threads: int = 0  # intra-op threads; 0: onnxruntime's default
    op_breakdown: bool = True
    roofline: bool = True
    seed: int = 0
    engine: str | None = None  # a build target: time its TensorRT engine, not the ONNX graph
    # speculative decoding timed beside plain decoding (runtime/speculative.py): a draft
    # bundle or prompt lookup's n-gram size, and --speculate K|auto
    draft: str | None = None
    lookup: int | None = None
    speculate: str | None = None

    def __post_init__(self):
        for name, values in (("--prompt-len", self.prompt_lens), ("--batch", self.batches)):
            if not values or any(int(v) < 1 for v in values):
                raise ArxError(f"{name} takes positive integers (got {','.join(map(str, values))})")
        if self.gen_len < 2:
            raise ArxError(f"--gen-len must be >= 2 so there is a decode step to time (got {self.gen_len})")
        if self.runs < 1:
            raise ArxError(f"--runs must be >= 1 (got {self.runs})")
        if self.warmup < 0:
            raise ArxError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.threads < 0:
            raise ArxError(f"--threads must be >= 0 (got {self.threads})")

    def check_context(self, manifest: Manifest, bundle: Path) -> None:
        need = max(self.prompt_lens) + self.gen_len
        if need > manifest.kv.max_seq_len:
            raise ArxError(f"prompt of {max(self.prompt_lens)} + {self.gen_len} generated tokens "
                           f"exceeds the context of {bundle} ({manifest.kv.max_seq_len} tokens); "
                           f"lower --prompt-len/--gen-len or re-export with a larger --max-seq-len")

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(p, b) for b in self.batches for p in self.prompt_lens]


# --- the backend profiler interface -----------------------------------------------------------

@dataclass
class OpTime:
    op_type: str
    total_ms: float  # summed over every node of this type and every run of the phase
    calls: int
    share: float  # of the phase's node time

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class OpProfiler(Protocol):
    """A backend's own per-op profiler. `session` runs traced; `op_breakdown(labels)` ends the
    trace and sums node time by op type per label, where labels[i] names the i-th graph run
    (e.g. "prefill", "decode"). ORT implements it here; TensorRT's IProfiler can later."""

    session: DecoderSession

    def op_breakdown(self, labels: list[str]) -> dict[str, list[OpTime]]: ...


class OrtTraceProfiler:
    """onnxruntime's profiler: SessionOptions.enable_profiling writes a Chrome-trace JSON with
    one `model_run` event per run and one `<node>_kernel_time` event (args.op_name) per node."""

    def __init__(self, bundle: Path, manifest: Manifest, options: BackendOptions):
        self._dir = tempfile.TemporaryDirectory(prefix="arx-profile-")
        traced = dataclasses.replace(options, enable_profiling=True,
                                     profile_prefix=str(Path(self._dir.name) / "ort"))
        self.session = DecoderSession(bundle, traced, manifest)

    def op_breakdown(self, labels: list[str]) -> dict[str, list[OpTime]]:
        import json

        path = self.session.backend.close()
        try:
            events = json.loads(Path(path).read_text()) if path else []
        finally:
            self._dir.cleanup()
        return aggregate_ort_trace(events, labels)


def aggregate_ort_trace(events: list[dict], labels: list[str]) -> dict[str, list[OpTime]]:
    """Sum kernel time by op type within each labelled `model_run` window."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    if len(runs) != len(labels):
        raise RuntimeError(f"the ORT trace holds {len(runs)} runs, expected {len(labels)}")
    starts = np.array([r["ts"] for r in runs])
    ends = starts + np.array([r["dur"] for r in runs])
    sums: dict[str, dict[str, list[float]]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > ends[i]:
            continue
        op = e.get("args", {}).get("op_name", "?")
        slot = sums.setdefault(labels[i], {}).setdefault(op, [0.0, 0])
        slot[0] += e["dur"] / 1e3
        slot[1] += 1
    out = {}
    for label, ops in sums.items():
        total = sum(v[0] for v in ops.values()) or 1.0
        out[label] = sorted((OpTime(op, ms, n, ms / total) for op, (ms, n) in ops.items()),
                            key=lambda t: -t.total_ms)
    return out


PROFILERS: dict[str, Callable[..., OpProfiler]] = {"onnxruntime": OrtTraceProfiler}


# --- measurements -----------------------------------------------------------------------------

@dataclass
class ShapeResult:
    prompt_len: int
    batch: int
    ttft_ms: float
    decode_ms: dict[str, float]  # p50/p90/p99 of one decode step (whole batch), median over runs
    tokens_per_s: float  # decode tokens/s over the batch, median over runs
    peak_rss_mb: float
    runs: list[dict] = field(default_factory=list)
    roofline: dict | None = None
    op_breakdown: dict[str, list[dict]] = field(default_factory=dict)
    speculation: dict | None = None  # the same shape with --draft/--lookup, and its speed-up

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BundleProfile:
    bundle: str
    model: dict
    device: str
    results: list[ShapeResult]
    weights: dict | None = None

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "model": self.model, "device": self.device,
                "weights": self.weights, "results": [r.to_json() for r in self.results]}


def _prompts(rng: np.random.Generator, vocab: int, prompt_len: int, batch: int) -> list[list[int]]:
    low = min(3, vocab - 1)  # skip the usual pad/bos/eos ids where the vocabulary allows
    return [rng.integers(low, vocab, prompt_len).tolist() for _ in range(batch)]


def _run_stats(r: GenerationResult, batch: int) -> dict:
    steps = np.array(r.step_s) * 1e3
    p50, p90, p99 = np.percentile(steps, [50, 90, 99])
    return {"ttft_ms": r.prefill_s * 1e3, "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "tokens_per_s": r.decode_tokens_per_s}  # a speculative step makes several


def _generate_options(opts: ProfileOptions) -> GenerateOptions:
    return GenerateOptions(max_new_tokens=opts.gen_len, stop_on_eos=False,
                           sampling=SamplingOptions(do_sample=False))


Runner = Callable[[list[list[int]], GenerateOptions], GenerationResult]


def time_shape(run: Runner, vocab: int, opts: ProfileOptions, prompt_len: int, batch: int,
               tick: Callable[[], None] = lambda: None) -> ShapeResult:
    """Warm-up, then `runs` timed generations of one (prompt length, batch)."""
    rng = np.random.default_rng(opts.seed)
    gen_opts = _generate_options(opts)
    reset_peak_rss()
    runs = []
    for i in range(opts.warmup + opts.runs):
        result = run(_prompts(rng, vocab, prompt_len, batch), gen_opts)
        if i >= opts.warmup:
            runs.append(_run_stats(result, batch))
        tick()
    med = lambda k: float(statistics.median(r[k] for r in runs))  # noqa: E731
    return ShapeResult(prompt_len, batch, ttft_ms=med("ttft_ms"),
                       decode_ms={q: med(q) for q in ("p50", "p90", "p99")},
                       tokens_per_s=med("tokens_per_s"), peak_rss_mb=peak_rss() / 2**20, runs=runs)


def trace_ops(profiler: OpProfiler, opts: ProfileOptions, results: list[ShapeResult],
              tick: Callable[[], None] = lambda: None) -> None:
    """One traced generation per shape; fills each result's op_breakdown (prefill, decode)."""
    labels: list[str] = []
    rng = np.random.default_rng(opts.seed + 1)
    vocab = profiler.session.manifest.vocab_size
    for r in results:
        res = generate(profiler.session, _prompts(rng, vocab, r.prompt_len, r.batch),
                       _generate_options(opts))
        key = f"{r.prompt_len}x{r.batch}"
        labels += [f"prefill@{key}"] + [f"decode@{key}"] * len(res.step_s)
        tick()
    by_label = profiler.op_breakdown(labels)
    for r in results:
        key = f"{r.prompt_len}x{r.batch}"
        r.op_breakdown = {ph: [t.to_json() for t in by_label.get(f"{ph}@{key}", [])] for ph in PHASES}


def profile_bundle(bundle: str | Path, opts: ProfileOptions, *, bandwidth: float | None = None,
                   tick: Callable[[], None] = lambda: None) -> BundleProfile:
    """Everything `arx profile` reports for one bundle. `bandwidth` in bytes/s (None: no roofline)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    opts.check_context(manifest, bundle)
    if opts.engine:
        return _profile_engine(bundle, manifest, opts, tick)
    backend_opts = BackendOptions(device=opts.device, intra_op_threads=opts.threads)
    results = []
    with DecoderSession(bundle, backend_opts, manifest) as session:
        device = session.backend.device
        run = lambda prompts, o: generate(session, prompts, o)  # noqa: E731
        for p, b in opts.shapes:
            results.append(time_shape(run, manifest.vocab_size, opts, p, b, tick))
        if opts.draft or opts.lookup:
            from arx.runtime.speculative import profile_speculation

            profile_speculation(session, bundle, opts, results, tick)
    if opts.op_breakdown:
        trace_ops(PROFILERS["onnxruntime"](bundle, manifest, backend_opts), opts, results, tick)
    weights = None
    if opts.roofline and bandwidth and device == "cpu":  # the bandwidth measured is host DRAM
        weights = weight_bytes(bundle, manifest)
        for r in results:
            roof = Roofline.for_decode(weights, manifest.kv, r.prompt_len, opts.gen_len, r.batch,
                                       bandwidth)
            r.roofline = roof.to_json(measured_ms=r.decode_ms["p50"])
    return BundleProfile(str(bundle), _model_facts(manifest), device, results, weights)


def _profile_engine(bundle: Path, manifest: Manifest, opts: ProfileOptions,
                    tick: Callable[[], None]) -> BundleProfile:
    from arx.runtime import engine_session

    with engine_session.open_engine(bundle, opts.engine) as session:
        run = lambda prompts, o: generate(session, prompts, o)  # noqa: E731
        results = [time_shape(run, manifest.vocab_size, opts, p, b, tick) for p, b in opts.shapes]
    return BundleProfile(str(bundle), _model_facts(manifest), f"tensorrt:{opts.engine}", results)


def _model_facts(m: Manifest) -> dict:
    quant = m.extensions.get("quantization")
    return {"family": m.family, "vocab_size": m.vocab_size, "layers": m.kv.layers,
            "kv_heads": m.kv.kv_heads, "head_dim": m.kv.head_dim, "max_seq_len": m.kv.max_seq_len,
            "parameters": m.model.get("parameters"),
            "scheme": (quant or {}).get("scheme", "fp32") if isinstance(quant, dict) else "fp32"}


def progress_total(opts: ProfileOptions) -> int:
    """Generations one bundle takes (for a progress bar)."""
    n = len(opts.shapes)
    timed = n * (opts.warmup + opts.runs) * (2 if opts.draft or opts.lookup else 1)
    return timed + (n if opts.op_breakdown and not opts.engine else 0)


__all__ = ["ProfileOptions", "OpProfiler", "OrtTraceProfiler", "OpTime", "ShapeResult",
           "BundleProfile", "profile_bundle", "aggregate_ort_trace", "progress_total",
           "memory_bandwidth"]
