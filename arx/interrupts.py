"""Ctrl-C is always a KeyboardInterrupt, even when it lands inside an import.

An interrupt raised while a C extension initialises does not always reach arx as one:
onnxruntime's module init prints the KeyboardInterrupt's traceback itself and raises
ImportError("import numpy failed") in its place, and pybind11 modules (onnx) raise
ImportError("initialization failed") from it. So while an import runs, the CLI holds a SIGINT
back and raises it as soon as the outermost import has returned: the import finishes (or fails
on its own), then the command stops with `arx: interrupted`.

The check runs in signal handlers on the main thread only (a timer, SIGALRM, looks again every
few milliseconds while an interrupt is held), so no thread can deliver a stray second one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

# the frames of an import in progress (the import system is these two frozen modules)
_IMPORT_FILES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")
_RECHECK_S = 0.02


def importing(frame) -> bool:
    """Whether `frame` runs inside an import (some frame below it is the import system's)."""
    while frame is not None:
        if frame.f_code.co_filename in _IMPORT_FILES:
            return True
        frame = frame.f_back
    return False


class _HeldInterrupt:
    def __init__(self):
        self.pending = False

    def on_sigint(self, _signum, frame) -> None:
        if importing(frame):
            self.pending = True
            signal.setitimer(signal.ITIMER_REAL, _RECHECK_S)
            return
        self._raise()

    def on_alarm(self, _signum, frame) -> None:
        if not self.pending:  # a timer that fired after a later Ctrl-C was already raised
            return
        if importing(frame):
            signal.setitimer(signal.ITIMER_REAL, _RECHECK_S)
            return
        self._raise()

    def _raise(self) -> None:
        self.pending = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_outside_imports() -> Iterator[None]:
    """Within the block, a Ctrl-C during an import is raised once the import has returned.

    A no-op off the main thread (signal handlers can only be set there), where there is no
    interval timer (Windows), and where SIGINT is not Python's default handler (ignored in a
    background job, or an embedding program's own)."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held = _HeldInterrupt()
    old_int = signal.signal(signal.SIGINT, held.on_sigint)
    old_alarm = signal.signal(signal.SIGALRM, held.on_alarm)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGINT, old_int)
        if held.pending:  # the block ended before the timer looked again: still an interrupt
            raise KeyboardInterrupt
