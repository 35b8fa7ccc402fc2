"""Per-step checksums of Orbax checkpoints: written once a step is committed, checked before a restore.

Orbax's commit markers say a save finished; they say nothing about the bytes staying intact
afterwards (a flipped bit on disk, a file truncated by a copy, a half-synced network disk).
`<step>/gtpo_checksums.json` lists every file of the step with its size and CRC-32; a step
whose files disagree with it is damaged. A step without the file (written before checksums
existed, or killed between Orbax's commit and the checksum) can only be restored unverified.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from concurrent.futures import Future

import jax

log = logging.getLogger(__name__)

MANIFEST = "gtpo_checksums.json"
DAMAGED = "damaged"
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


class VerifiedSteps:
    """Checksums for `Checkpointer` (which provides directory, read_only, all_steps, _resolve_step,
    _is_complete, _manager and the _unsealed/_sealing/_sealer/_verified state)."""

    _sealing: list[Future]

    def usable_step(self, step: int | None = None) -> int:
        """`step` after checking its checksums (CheckpointCorruptError if damaged); with None the
        newest step that passes, damaged newer ones set aside (read-only: skipped) with a warning."""
        if step is not None:
            step = self._resolve_step(step)
            self._check_integrity(step)
            return step
        for candidate in reversed(self.all_steps()):
            try:
                self._check_integrity(candidate)
                return candidate
            except CheckpointCorruptError as e:
                self._set_aside_damaged(candidate, e)
        raise FileNotFoundError(f"{self.directory} holds no complete, undamaged checkpoint")

    def _check_integrity(self, step: int) -> None:
        if step in self._verified:
            return
        if not verify_step(os.path.join(self.directory, str(step))):
            log.info("checkpoint step %d in %s has no checksums (written before they existed, or killed right "
                     "after the save); restoring it unverified", step, self.directory)
        self._verified.add(step)

    def _set_aside_damaged(self, step: int, error: CheckpointCorruptError) -> None:
        if self.read_only or jax.process_index() != 0:
            log.warning("%s; skipping step %d, trying the previous one", error, step)
        else:
            dest = os.path.join(self.directory, DAMAGED, f"{step}-{int(time.time())}")
            log.warning("%s; moved step %d to %s (delete it once you no longer need it) and using the previous "
                        "step", error, step, dest)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"gtpo_jax.checkpoint: damaged step {step} set aside")
        if not self.read_only:
            self._manager.reload()

    def poll(self) -> None:
        """Raise the error of a failed background save now; checksum the saves that have finished."""
        self._manager.check_for_errors()
        if self._unsealed and not self._manager.is_saving_in_progress():
            self._seal(self._unsealed)
            self._unsealed = []
        for future in [f for f in self._sealing if f.done()]:
            self._sealing.remove(future)
            future.result()  # a checksum that could not be written (e.g. disk full) is an error too

    def _seal(self, steps: list[int]) -> None:
        if self._sealer is None:
            return
        for step in steps:
            self._sealing.append(self._sealer.submit(self._write_manifest, step))

    def _write_manifest(self, step: int) -> None:
        step_dir = os.path.join(self.directory, str(step))
        if self._is_complete(step):  # orbax's keep-K may have deleted it meanwhile
            try:
                write_manifest(step_dir)
            except FileNotFoundError:
                pass  # deleted while being read
