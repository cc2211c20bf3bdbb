"""Prometheus text exposition of the server's counters, gauges and latency histograms.

Written by hand (a few dozen lines) rather than with prometheus_client: the format is plain
text, and the numbers come from one scheduler thread and the HTTP handlers, under one lock.
"""

from __future__ import annotations

import threading
from collections import defaultdict

# seconds; time to first token includes the wait in the queue
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PREFIX = "arx_serve"


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets, self.counts = buckets, [0] * len(buckets)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        self.total, self.n = self.total + value, self.n + 1
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge}"}} {c}' for edge, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}",
                      f"{name}_count {self.n}"]


class Metrics:
    """What the scheduler reports (step, token, finished) and the API counts (rejected)."""

    HISTOGRAMS = {
        "time_to_first_token_seconds": "submission to first token, queue wait included",
        "inter_token_latency_seconds": "between two tokens of one request",
        "request_latency_seconds": "submission to the last token",
        "step_seconds": "one scheduler step (all rows)",
    }

    def __init__(self):
        self._lock = threading.Lock()
        self.hist = {name: Histogram() for name in self.HISTOGRAMS}
        self.requests = defaultdict(int)  # finish reason (stop, length, cancelled, error) -> n
        self.rejected = defaultdict(int)  # HTTP status -> n
        self.prompt_tokens = self.generation_tokens = 0

    def step(self, seconds: float, rows: int) -> None:
        with self._lock:
            self.hist["step_seconds"].observe(seconds)

    def token(self, seconds: float, first: bool) -> None:
        with self._lock:
            self.generation_tokens += 1
            name = "time_to_first_token_seconds" if first else "inter_token_latency_seconds"
            self.hist[name].observe(seconds)

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int,
                 seconds: float) -> None:
        with self._lock:
            self.requests[reason] += 1
            self.prompt_tokens += prompt_tokens
            if reason != "error":
                self.hist["request_latency_seconds"].observe(seconds)

    def reject(self, status: int) -> None:
        with self._lock:
            self.rejected[status] += 1

    def render(self, stats: dict) -> str:
        """The exposition text; `stats` is the scheduler's (running, waiting, free_slots)."""
        p = PREFIX
        with self._lock:
            lines = [f"# HELP {p}_requests_total requests finished, by finish reason",
                     f"# TYPE {p}_requests_total counter"]
            lines += [f'{p}_requests_total{{finish_reason="{k}"}} {v}'
                      for k, v in sorted(self.requests.items())]
            lines += [f"# HELP {p}_rejected_total requests refused before running, by HTTP status",
                      f"# TYPE {p}_rejected_total counter"]
            lines += [f'{p}_rejected_total{{status="{k}"}} {v}' for k, v in sorted(self.rejected.items())]
            for name, value in (("prompt_tokens_total", self.prompt_tokens),
                                ("generation_tokens_total", self.generation_tokens)):
                lines += [f"# TYPE {p}_{name} counter", f"{p}_{name} {value}"]
            for key in ("running", "waiting", "free_slots"):
                lines += [f"# TYPE {p}_{key} gauge", f"{p}_{key} {stats[key]}"]
            for name, help_ in self.HISTOGRAMS.items():
                lines += [f"# HELP {p}_{name} {help_}", f"# TYPE {p}_{name} histogram"]
                lines += self.hist[name].lines(f"{p}_{name}")
        return "\n".join(lines) + "\n"
