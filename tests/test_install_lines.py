"""The install lines the README documents resolve together: a fast static check of the extras'
pins against LMDeploy's, the one-CUDA-stack rule on a made-up pip report, and (slow, needs PyPI)
`scripts/check_install_lines.py`, which dry-runs every line with pip."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import check_install_lines as cil  # noqa: E402


def extras() -> dict[str, list[Requirement]]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    out = {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}
    out[""] = [Requirement(r) for r in project["dependencies"]]
    return out


def test_readme_install_lines_are_found():
    with open(os.path.join(ROOT, "README.md")) as f:
        targets = cil.documented_targets(f.read())
    assert {".[plot]", ".[test]", ".[gpu,lmdeploy]"} <= set(targets)  # demo, tests, GPU node
    assert cil.union_target(targets).startswith(".[") and "gpu" in cil.union_target(targets)


def test_extras_pins_admit_lmdeploy_018_requirements():
    """Every package named both by our extras and by LMDeploy 0.18 has a version both accept (the
    candidates are the versions the specifiers name: enough for the bounds pins are made of)."""
    try:
        lmdeploy_reqs = [Requirement(r) for r in importlib.metadata.requires("lmdeploy") or []]
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lmdeploy's metadata is not installed (scripts/install_lmdeploy_cpu.sh)")
    lmdeploy_reqs = [r for r in lmdeploy_reqs if r.marker is None or "extra" not in str(r.marker)]
    ours = [r for reqs in extras().values() for r in reqs]
    by_name: dict[str, list] = {}
    for r in ours + lmdeploy_reqs:
        by_name.setdefault(r.name.lower(), []).append(r.specifier)
    checked = 0
    for name, specs in by_name.items():
        if len(specs) < 2:
            continue
        candidates = {Version(s.version.rstrip(".*")) for spec in specs for s in spec}
        assert any(all(spec.contains(v, prereleases=True) for spec in specs) for v in candidates), (name, specs)
        checked += 1
    assert checked >= 3  # torch, transformers, safetensors at least


def test_gpu_extra_is_cuda13_like_lmdeploys_torch():
    gpu = extras()["gpu"]
    assert [r.name for r in gpu] == ["jax"] and gpu[0].extras == {"cuda13"}


def _report(*items):
    return {"install": [{"metadata": {"name": n, "version": "1", "requires_dist": reqs}} for n, reqs in items]}


def test_two_cuda_stacks_are_detected():
    torch13 = ("torch", ["nvidia-nccl-cu13==2.29.7; platform_system == 'Linux'", "filelock"])
    assert cil.cuda_majors(_report(("jax-cuda13-plugin", []), torch13)) == ("13", "13")
    assert cil.cuda_majors(_report(("jax-cuda12-plugin", []), torch13)) == ("12", "13")
    assert cil.cuda_majors(_report(("torch", ["filelock"]))) == ("-", "cpu")


@pytest.mark.slow
def test_every_documented_install_line_resolves_with_pip():
    """Needs PyPI; about a minute per line (seven lines)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_install_lines.py")],
                            capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_the_chat_template_renderer_is_a_core_dependency():
    """Prompts are rendered by transformers' apply_chat_template, which imports jinja2 without
    depending on it: the demo's install (`.[plot]`, no torch to pull it in) failed at its first
    prompt until jinja2 was declared."""
    assert "jinja2" in {r.name.lower() for r in extras()[""]}
