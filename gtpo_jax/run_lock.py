"""One run per output directory: an exclusive lock on `<output_dir>/.lock`, naming its owner.

Two runs writing one directory interleave metrics.jsonl and resume from each other's
checkpoints mid-save. The lock is an flock(2) on the file, which the kernel drops when the
owning process dies (kill -9 included), so a crashed run never leaves it behind on a local
disk. The file also records the owner's pid, host and start time for the refusal message.
Where a lock outlives its owner (some network filesystems), delete the file to break it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

log = logging.getLogger("gtpo_jax")

LOCK_NAME = ".lock"


class OutputDirInUseError(RuntimeError):
    """Another process holds the output directory."""


class OutputDirLock:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "OutputDirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise OutputDirInUseError(
                f"{os.path.dirname(self.path)} is in use by another run ({owner}); wait for it to finish or choose "
                f"another output_dir. If that run is gone and the lock stayed (network filesystems), delete {self.path}"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("cannot lock %s (%s): nothing stops a second run from using this directory", self.path, e)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _read_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}: {owner['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"
