"""What the command-line entry points share: an error ends the program with one line on stderr."""

from __future__ import annotations

import contextlib
import sys


def error_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or "(no message)"
    return f"error: {type(error).__name__}: {message} (rerun with --debug for the traceback)"


@contextlib.contextmanager
def one_line_errors(debug: bool):
    """Print an exception as one line and swallow it (the caller then exits 1); with `debug`,
    let it through with its traceback. KeyboardInterrupt and SystemExit always pass."""
    if debug:
        yield
        return
    try:
        yield
    except Exception as e:  # noqa: BLE001 — the whole point: any error, one line
        print(error_line(e), file=sys.stderr)
