"""Progress lines: a warning raised during a step never lands inside the step's open line."""

from __future__ import annotations

import io
import warnings

import pytest

from arx.progress import Steps


def test_warnings_wait_for_the_step_line_to_end():
    stream = io.StringIO()
    steps = Steps(2, stream=stream)
    with steps.step("loading"):
        for _ in range(3):  # the same warning from a loop is printed once
            warnings.warn("torch.load received a zip file", UserWarning, stacklevel=1)
    with pytest.raises(ValueError), steps.step("tracing"):
        warnings.warn("tracer note", UserWarning, stacklevel=1)
        raise ValueError("boom")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[1/2] loading ... ") and lines[0].endswith(" s")
    assert lines[1:] == ["  warning: torch.load received a zip file",
                         "[2/2] tracing ... failed", "  warning: tracer note"]


def test_quiet_steps_leave_warnings_alone():
    stream = io.StringIO()
    with pytest.warns(UserWarning, match="left to Python"), Steps(1, enabled=False, stream=stream).step("x"):
        warnings.warn("left to Python", UserWarning, stacklevel=1)
    assert stream.getvalue() == ""
