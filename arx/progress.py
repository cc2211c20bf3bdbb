"""Progress for long work: numbered steps with timings, and bars for loops (stderr)."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
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
        if not self.enabled:
            yield
            return
        print(f"[{self.n}/{self.total}] {what} ...", end="", file=self.stream, flush=True)
        t = time.perf_counter()
        # a warning printed mid-step (torch has many) would split the open line: hold them
        # until the line is finished, then print each once on a line of its own
        with warnings.catch_warnings(record=True) as caught:  # the filters in force still apply
            try:
                yield
            except BaseException:
                print(" failed", file=self.stream, flush=True)
                self._print_warnings(caught)
                raise
        print(f" {time.perf_counter() - t:.1f} s", file=self.stream, flush=True)
        self._print_warnings(caught)

    def _print_warnings(self, caught: list[warnings.WarningMessage]) -> None:
        seen = dict.fromkeys(" ".join(str(w.message).split()) for w in caught)
        for text in seen:
            print(f"  warning: {text}", file=self.stream, flush=True)


def bar(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[T]:
    """A tqdm bar on stderr, or the plain iterable when progress is off."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
