"""Per-step checksums of Orbax checkpoints: written once a step is committed, checked before a restore.

Orbax's commit markers say a save finished; they say nothing about the bytes staying intact
afterwards (a flipped bit on disk, a file truncated by a copy, a half-synced network disk).
`<step>/gtpo_checksums.json` lists every file of the step with its size and CRC-32; a step
whose files disagree with it is damaged. A step without the file (written before checksums
existed, or killed between Orbax's commit and the checksum) can only be restored unverified.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

from gtpo_jax.checkpoint.steps import is_complete

MANIFEST = "gtpo_checksums.json"
_CHUNK = 16 << 20


class CheckpointCorruptError(RuntimeError):
    """A checkpoint step whose files are not what was written (or cannot be read)."""


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: str) -> list[str]:
    names = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST and not name.startswith(f"{MANIFEST}.tmp"):
                names.append(rel)
    return sorted(names)


def write_manifest(step_dir: str) -> None:
    """Record size and CRC-32 of every file of a committed step (atomically: a reader never sees half)."""
    entries = {}
    for rel in _files(step_dir):
        path = os.path.join(step_dir, rel)
        entries[rel] = {"size": os.path.getsize(path), "crc32": _crc32(path)}
    tmp = os.path.join(step_dir, f"{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"algorithm": "crc32", "files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_step(step_dir: str) -> bool:
    """True when every file matches the manifest; False when the step has none (unverifiable).
    Raises CheckpointCorruptError naming the files that differ, are missing or were added."""
    manifest_path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        return False
    try:
        with open(manifest_path) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"{manifest_path} is unreadable ({e})") from None
    problems = []
    present = set(_files(step_dir))
    for rel, want in sorted(expected.items()):
        path = os.path.join(step_dir, rel)
        if rel not in present:
            problems.append(f"{rel} is missing")
        elif os.path.getsize(path) != want["size"]:
            problems.append(f"{rel} has {os.path.getsize(path)} bytes, {want['size']} were written")
        elif _crc32(path) != want["crc32"]:
            problems.append(f"{rel} has other contents than were written (CRC-32 differs)")
    problems.extend(f"{rel} was not part of the save" for rel in sorted(present - set(expected)))
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise CheckpointCorruptError(f"checkpoint {step_dir} is damaged: {shown}")
    return True


class ChecksumWriter:
    """Writes the manifest of each committed step on a background thread (process 0 only; the
    others just track nothing), so that a save returns as soon as orbax has the arrays."""

    def __init__(self, root: str, enabled: bool):
        self.root = root
        self._saved: list[int] = []  # saves started, manifest not yet scheduled
        self._writing: list[Future] = []
        self._pool = ThreadPoolExecutor(1, "checksums") if enabled else None

    def saved(self, step: int) -> None:
        self._saved.append(step)

    def poll(self, saving: bool) -> None:
        """Schedule the manifests of the saves that have finished (`saving`: orbax is still
        writing one) and raise the error of a manifest that could not be written (e.g. disk full)."""
        if self._saved and not saving:
            if self._pool is not None:
                self._writing.extend(self._pool.submit(self._write, step) for step in self._saved)
            self._saved = []
        for future in [f for f in self._writing if f.done()]:
            self._writing.remove(future)
            future.result()

    def wait(self) -> None:
        for future in self._writing:
            future.result()
        self._writing = []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _write(self, step: int) -> None:
        if is_complete(self.root, step):  # orbax's keep-K may have deleted it meanwhile
            try:
                write_manifest(os.path.join(self.root, str(step)))
            except FileNotFoundError:
                pass  # deleted while being read
