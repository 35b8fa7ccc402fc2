"""What the command-line entry points share: an error ends the program with one line on stderr,
and the process runs with glibc's malloc on transparent huge pages."""

from __future__ import annotations

import contextlib
import os
import platform
import sys

# XLA on the CPU mallocs every step's temporaries afresh (~1 GB for a 1k-token GTPO update), and
# glibc serves such blocks with new mmaps: each 4 KiB page faults again on every step (264k faults
# a step at 1k). glibc >= 2.35 can ask the kernel for transparent huge pages for them instead
# (512x fewer faults); it reads this only at process start, hence the re-exec below.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def hugepage_malloc_environ(environ, libc=None, thp_mode=None) -> dict | None:
    """`environ` with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, or None when it would change
    nothing or is not wanted: not glibc >= 2.35, transparent huge pages off ([never]), or the
    tunable already set either way (glibc.malloc.hugetlb=0 is how a user keeps 4 KiB pages)."""
    if HUGEPAGE_TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    name, version = libc or platform.libc_ver()
    if name != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
        return None
    if thp_mode is None:
        try:
            with open(THP_MODE_FILE) as f:
                thp_mode = f.read()
        except OSError:
            return None
    if "[never]" in thp_mode:
        return None
    tunables = ":".join(filter(None, [environ.get("GLIBC_TUNABLES"), f"{HUGEPAGE_TUNABLE}=1"]))
    return {**environ, "GLIBC_TUNABLES": tunables}


def started_as_module(name: str, argv: list[str] | None = None) -> bool:
    """Whether this interpreter was started as `python [options] -m NAME ...` (sys.orig_argv)."""
    argv = sys.orig_argv if argv is None else argv
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return i + 1 < len(argv) and argv[i + 1] == name
        if arg.startswith("-m"):
            return arg[2:] == name
        if not arg.startswith("-") or arg.startswith("-c"):  # a script or code comes first
            return False
        i += 2 if arg in ("-X", "-W") else 1  # the options that take a separate value
    return False


def reexec_with_hugepage_malloc() -> None:
    """Restart this very command (same pid, arguments and streams) with `hugepage_malloc_environ`,
    once; a no-op where it changes nothing. Called as early as possible (gtpo_jax/__init__.py for
    `-m gtpo_jax.train`): everything imported before it is imported twice."""
    environ = hugepage_malloc_environ(os.environ)
    if environ is not None:
        sys.stdout.flush(), sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environ)
