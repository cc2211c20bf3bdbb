"""What a refused command looks like from outside: exit 2 and one `arx: error:` line, nothing else."""

from __future__ import annotations

import subprocess
import sys

# `arx` as a user at a terminal starts it: SIGINT at Python's default handler, so a Ctrl-C is a
# KeyboardInterrupt. A test run started in the background of a non-interactive shell (`cmd &`,
# nohup, some CI runners) has SIGINT ignored, and an ignored signal stays ignored across exec:
# a child started plainly would shrug off the test's Ctrl-C and exit 0.
ARX_AT_A_TERMINAL = [sys.executable, "-c",
                     "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                     "from arx.cli import main; raise SystemExit(main())"]


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, stderr exactly one `arx: error:` line (no progress, no traceback), no stdout:
    the command stopped before doing any work (no report, no echoed prompt)."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("arx: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert proc.stdout == "", proc.stdout
    return lines[0]
