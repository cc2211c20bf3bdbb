"""User-facing errors: one line that says what is wrong and what to do, exit code 2."""

from __future__ import annotations

EXIT_USAGE = 2


class ArxError(Exception):
    """An error caused by the user's input. The CLI prints `arx: <message>` and exits 2.

    Messages are one line and end with what to do about it.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, details: str | None = None):
        super().__init__(" ".join(message.split()))
        self.details = details  # optional multi-line block (a table) printed after the line


class MissingDependency(ArxError):
    """An optional heavy package (an extra) is not installed."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed; "
            f"install it with: pip install 'arx[{extra}]'"
        )


def require(module: str, extra: str, purpose: str):
    """Import an optional module lazily, failing with the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # the module or one of its shared libraries is missing
        if _caused_by_interrupt(e):  # pybind11's module init wraps a Ctrl-C in ImportError
            raise KeyboardInterrupt from e
        if e.name not in (None, module, module.split(".")[0]):
            raise ArxError(f"{purpose} needs '{module}', which failed to import ({e}); "
                           f"reinstall it with: pip install 'arx[{extra}]'") from e
        raise MissingDependency(module, extra, purpose) from e


def _caused_by_interrupt(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False
