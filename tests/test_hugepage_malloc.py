"""The entry points restart themselves once with glibc's malloc on transparent huge pages
(gtpo_jax.cli): when that applies, that it keeps a user's own choice, and that the restart keeps
the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gtpo_jax.cli import hugepage_malloc_environ, started_as_module

MADVISE = "always [madvise] never\n"
GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize("environ, libc, thp, want", [
    ({}, GLIBC, MADVISE, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, MADVISE, "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, MADVISE, None),  # the user's choice stays
    ({}, GLIBC, "always madvise [never]\n", None),  # huge pages off: nothing to gain
    ({}, ("glibc", "2.34"), MADVISE, None),  # the tunable is new in 2.35
    ({}, ("", ""), MADVISE, None),  # musl and others
], ids=["plain", "appended", "user_choice", "thp_never", "old_glibc", "not_glibc"])
def test_when_the_tunable_is_added(environ, libc, thp, want):
    got = hugepage_malloc_environ(environ, libc=libc, thp_mode=thp)
    assert (None if got is None else got["GLIBC_TUNABLES"]) == want


PROBE = ("from gtpo_jax.cli import reexec_with_hugepage_malloc; reexec_with_hugepage_malloc(); "
         "import os, sys; print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")


@pytest.mark.skipif(hugepage_malloc_environ({}) is None, reason="no glibc >= 2.35 with transparent huge pages here")
def test_restart_keeps_arguments_and_a_users_setting():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, "a", "b=1"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "glibc.malloc.hugetlb=1 ['a', 'b=1']"
    env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=0"
    out = subprocess.run([sys.executable, "-c", PROBE, "a"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "glibc.malloc.hugetlb=0 ['a']"


@pytest.mark.parametrize("argv, want", [
    (["python", "-m", "gtpo_jax.train", "--config", "x.yaml"], True),
    (["python", "-X", "faulthandler", "-u", "-m", "gtpo_jax.train"], True),
    (["python", "-u", "-mgtpo_jax.train"], True),
    (["python", "-m", "gtpo_jax.evaluate"], False),
    (["python", "train.py", "-m", "gtpo_jax.train"], False),
    (["python", "-c", "pass"], False),
])
def test_started_as_module(argv, want):
    assert started_as_module("gtpo_jax.train", argv) is want

