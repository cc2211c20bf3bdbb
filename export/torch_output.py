"""torch's own output made fit for arx: one-line errors, and a terminal left to the progress line.

torch.export and torch.onnx colour their errors with terminal escape codes, put a banner line
before the real error (kept in `__cause__`), print partial graphs straight to sys.stderr and log
through handlers of their own. arx shows one `arx: error:` line and a progress line, so the
useful first line is taken whole (never cut mid-word) and the rest is kept off the terminal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from typing import Iterator

_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # CSI sequences: colours, cursor moves
# torch.export names the user's line as: File "/path/model.py", line 6, in forward\n    code
_USER_CALL = re.compile(r'raised this error:\s*File "([^"]+)", line (\d+), in \w+\s*\n\s*(\S[^\n]*)')


def plain(text: str) -> str:
    """`text` without terminal escape codes."""
    return _ESCAPE.sub("", text)


def error_summary(e: BaseException) -> str:
    """`Type: first line` of the innermost cause of `e`, the error wrappers are built around."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [line.strip() for line in plain(str(e)).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def user_call(e: BaseException) -> str | None:
    """`model.py line 6: if x.sum() > 0:`, where torch.export says the user's code failed."""
    while e is not None:
        found = _USER_CALL.search(plain(str(e)))
        if found:
            file, line, code = found.groups()
            return f"{file} line {line}: {code.strip()}"
        e = e.__cause__
    return None


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Keep torch's prints and log lines off the terminal while it loads or traces a model.

    What matters reaches the user through the exception (see error_summary); Python warnings
    are left to the caller (arx.progress.Steps prints them after the step's line).

    Stack traces are not taken meanwhile: torch symbolizes a traceback for every traced node
    (FX) and every symbol its structured trace log records (torch.__trace, which always has a
    lazy handler), none of which arx reads, and that native symbolizer crashed the whole
    process (SIGSEGV) in a long test run after onnxruntime, Triton and Ray had loaded.
    """
    import torch.fx.config as fx_config

    torch_log, trace_log = logging.getLogger("torch"), logging.getLogger("torch.__trace")
    level, traces, handlers = torch_log.level, fx_config.do_not_emit_stack_traces, trace_log.handlers
    torch_log.setLevel(logging.CRITICAL)  # torch.export logs its errors too; they are raised
    fx_config.do_not_emit_stack_traces, trace_log.handlers = True, []
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        torch_log.setLevel(level)
        fx_config.do_not_emit_stack_traces, trace_log.handlers = traces, handlers
