"""Where exports go: a destination is replaced whole, and only when an earlier export of ours wrote it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

# Left in every directory we export: a later export may replace such a directory, not others.
EXPORT_MARKER = ".gtpo_jax_export"


def check_export_destination(out_dir: str, *, overwrite: bool = False) -> None:
    """Refuse a non-empty directory that no export of ours wrote (unless `overwrite`)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output directory")
    if (os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite
            and not os.path.isfile(os.path.join(out_dir, EXPORT_MARKER))):
        raise FileExistsError(
            f"{out_dir} is not empty and was not written by a gtpo_jax export; choose a new (or empty) directory, "
            "or replace it whole with --overwrite (python -m convert) / overwrite=True"
        )


@contextlib.contextmanager
def staged_directory(out_dir: str, *, overwrite: bool = False):
    """Yield a fresh directory beside `out_dir`; when the block succeeds, it replaces `out_dir` whole.

    Files get the usual permissions (0644 under a 022 umask; safetensors writes 0600). On failure
    the stage is removed and `out_dir` is as before. The swap is two renames: a crash between
    them leaves the previous export as `.<name>.old-*` beside it, never a mix of two exports.
    """
    out_dir = os.path.abspath(out_dir)
    check_export_destination(out_dir, overwrite=overwrite)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield stage
        with open(os.path.join(stage, EXPORT_MARKER), "w") as f:
            f.write("written by gtpo_jax; a later export may replace this directory\n")
        umask = os.umask(0)
        os.umask(umask)
        for root, dirs, files in os.walk(stage):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~umask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~umask)
        os.chmod(stage, 0o777 & ~umask)
        old = None
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, name))
        os.rename(stage, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise

