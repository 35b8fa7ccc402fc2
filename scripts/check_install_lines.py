"""Resolve every install line README.md documents, with pip, without installing anything.

    python scripts/check_install_lines.py [--readme README.md] [--extra-line '.[gpu,lmdeploy,test]']

Each `pip install ...` line of the README that installs this project is re-run as
`pip install --dry-run --ignore-installed --quiet --report <json> ...` (on any machine, a CPU one
included: pip resolves for this platform; PyPI must be reachable). The union of all extras is
checked too: when it resolves, every combination of them does. For a line that brings both JAX's
CUDA plugin and LMDeploy's CUDA torch, the two must use the same CUDA major version (one set of
nvidia-* libraries, not two). Prints a table; exits 1 when any line fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `pip install -e ".[test]"`, `pip install '.[lmdeploy]'`, `pip install -e .` (the project itself)
INSTALL_RE = re.compile(r"""pip install\s+(?:-e\s+)?(["']?)\.(\[[\w,\-]+\])?\1(?=[\s`&;)]|$)""")
CUDA_SUFFIX_RE = re.compile(r"-cu(\d+)$")
JAX_PLUGIN_RE = re.compile(r"^jax-cuda(\d+)-plugin$")


@dataclasses.dataclass
class Resolution:
    target: str  # what was asked for, e.g. ".[gpu,lmdeploy]"
    ok: bool
    problem: str = ""
    packages: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> version
    jax_cuda: str = "-"  # CUDA major of JAX's plugin
    torch_cuda: str = "-"  # CUDA major of torch's nvidia-* requirements ("cpu": none)


def documented_targets(readme: str) -> list[str]:
    """`.[extras]` of every install line of this project in the README, in order, once each."""
    seen: list[str] = []
    for m in INSTALL_RE.finditer(readme):
        target = "." + (m.group(2) or "")
        if target not in seen:
            seen.append(target)
    return seen


def union_target(targets: list[str]) -> str:
    extras = sorted({e for t in targets for e in re.findall(r"[\w\-]+", t.partition("[")[2])})
    return f".[{','.join(extras)}]" if extras else "."


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cuda_majors(report: dict) -> tuple[str, str]:
    """(JAX plugin's CUDA major, torch's CUDA major) from a pip report; "-" when absent."""
    jax_majors, torch_cuda = set(), "-"
    for item in report["install"]:
        meta = item["metadata"]
        name = _norm(meta["name"])
        m = JAX_PLUGIN_RE.match(name)
        if m:
            jax_majors.add(m.group(1))
        if name == "torch":
            majors = {m.group(1) for req in meta.get("requires_dist") or []
                      if (m := CUDA_SUFFIX_RE.search(_norm(re.split(r"[\s;<>=!\[~(]", req)[0])))}
            torch_cuda = ",".join(sorted(majors)) or "cpu"
    return ",".join(sorted(jax_majors)) or "-", torch_cuda


def resolve(target: str, *, cwd: str = ROOT) -> Resolution:
    with tempfile.TemporaryDirectory() as tmp:
        report_path = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", report_path, target]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines()
                     if ln.strip() and "is ignored" not in ln]
            return Resolution(target, False, " | ".join(lines[-6:]) or f"pip exited {proc.returncode}")
        with open(report_path) as f:
            report = json.load(f)
    res = Resolution(target, True, packages={_norm(i["metadata"]["name"]): i["metadata"]["version"]
                                             for i in report["install"]})
    res.jax_cuda, res.torch_cuda = cuda_majors(report)
    if "," in res.jax_cuda:
        res.ok, res.problem = False, f"several JAX CUDA plugins (CUDA {res.jax_cuda})"
    elif res.jax_cuda != "-" and res.torch_cuda not in ("-", "cpu") and res.jax_cuda != res.torch_cuda:
        res.ok, res.problem = False, (f"two CUDA stacks: JAX's plugin is for CUDA {res.jax_cuda}, torch's "
                                      f"libraries for CUDA {res.torch_cuda}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--extra-line", action="append", default=[], help="another target to resolve, e.g. '.[gpu]'")
    args = ap.parse_args(argv)
    with open(args.readme) as f:
        targets = documented_targets(f.read())
    if not targets:
        print(f"no `pip install .[...]` line found in {args.readme}", file=sys.stderr)
        return 1
    union = union_target(targets)
    for t in [union, *args.extra_line]:
        if t not in targets:
            targets.append(t)
    results = []
    for t in targets:
        print(f"resolving pip install {shlex.quote(t)} ...", flush=True)
        results.append(resolve(t))
    print(f"\n{'install target':<28} {'result':<6} {'torch':<14} {'jax':<8} {'CUDA jax/torch':<15} problem")
    for r in results:
        print(f"{r.target:<28} {'ok' if r.ok else 'FAIL':<6} {r.packages.get('torch', '-'):<14} "
              f"{r.packages.get('jax', '-'):<8} {r.jax_cuda + '/' + r.torch_cuda:<15} {r.problem}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
