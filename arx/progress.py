"""Progress for long work: numbered steps with timings, and bars for loops (stderr)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Steps:
    """`with steps.step("building graph"):` prints `[2/5] building graph ... 1.3 s`."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled, self.n = total, enabled, 0
        self.stream = stream or sys.stderr

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.n += 1
        if self.enabled:
            print(f"[{self.n}/{self.total}] {what} ...", end="", file=self.stream, flush=True)
        t = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.enabled:
                print(" failed", file=self.stream, flush=True)
            raise
        if self.enabled:
            print(f" {time.perf_counter() - t:.1f} s", file=self.stream, flush=True)


def bar(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on stderr, or the plain iterable when progress is off."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
