"""Ctrl-C is always a KeyboardInterrupt, even when it lands inside an import.

An interrupt raised while a C extension initialises does not always reach arx as one:
onnxruntime's module init prints the KeyboardInterrupt's traceback itself and raises
ImportError("import numpy failed") in its place, and pybind11 modules (onnx) raise
ImportError("initialization failed") from it. So while an import runs, the CLI holds a SIGINT
back and raises it as soon as the outermost import has returned: the import finishes (or fails
on its own), then the command stops with `arx: interrupted`.

The check runs in signal handlers on the main thread only (while an interrupt is held, a timer,
SIGALRM, looks again every few milliseconds), so no thread can deliver a stray second one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

# the frames of an import in progress (the import system is these two frozen modules)
_IMPORT_FILES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")
_RECHECK_S = 0.002  # the window a held Ctrl-C lets the command run on


def importing(frame) -> bool:
    """Whether `frame` runs inside an import (some frame below it is the import system's)."""
    while frame is not None:
        if frame.f_code.co_filename in _IMPORT_FILES:
            return True
        frame = frame.f_back
    return False


class _HeldInterrupt:
    """SIGINT handler; SIGALRM and the interval timer are taken only while an interrupt is held."""

    def __init__(self):
        self.pending = False
        self.old_alarm = None

    def on_sigint(self, _signum, frame) -> None:
        if importing(frame):
            if not self.pending:
                self.pending = True
                self.old_alarm = signal.signal(signal.SIGALRM, self.on_alarm)
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

    def release(self) -> bool:
        """Give SIGALRM back; whether an interrupt was held."""
        held, self.pending = self.pending, False
        if held:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old_alarm)
        return held

    def _raise(self) -> None:
        self.release()
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
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        if held.release():  # the block ended before the timer looked again: still an interrupt
            raise KeyboardInterrupt
