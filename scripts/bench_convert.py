"""Time and peak host memory of `python -m convert hf2orbax` / `orbax2hf` on a random model.

The converters promise at most one copy of the model in host memory (plus the interpreter).
Each conversion runs in a fresh subprocess that reports its own peak RSS (VmHWM: anonymous and
file-backed pages, so mmapped safetensors count too); a baseline subprocess imports the same
libraries and starts jax the same way, and the figure of merit is

    (peak - baseline) / model_bytes      (target: about 1)

    python scripts/bench_convert.py                           # hidden 1024 x 8 layers x vocab 32k, untied, fp32
    python scripts/bench_convert.py --hidden 2048 --layers 16 --export-dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), falling back to getrusage (KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(argv: list[str]) -> None:
    """Run the CLI in this process (or only its imports, for the baseline) and print the peak RSS as JSON."""
    import jax

    import convert.__main__ as cli
    import gtpo_jax.checkpoint  # noqa: F401  (what the CLI imports lazily)

    jax.devices()  # the backend starts in both the baseline and the real runs
    rc = 0 if argv == ["baseline"] else cli.main(argv + ["--quiet"])
    print(json.dumps({"rc": rc, "peak_rss": _peak_rss_bytes()}), flush=True)


def write_random_source(path: str, args: argparse.Namespace) -> int:
    """A random SDAR-style HF directory written with safetensors directly (no torch); returns its weight bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    sys.path.insert(0, REPO)
    from gtpo_jax.hf_io import np_dtype
    from gtpo_jax.model import ModelConfig
    from gtpo_jax.model.params import expected_hf_names, hf_shape

    heads = args.hidden // args.head_dim
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 3 * args.hidden,
                      num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // 2), head_dim=args.head_dim,
                      tie_word_embeddings=args.tie, block_size=4, rope_theta=1e6)
    rng = np.random.default_rng(0)
    dtype = np_dtype(args.dtype)
    tensors = {}
    for name in expected_hf_names(cfg):
        shape = hf_shape(name, cfg)
        scale = 1.0 if len(shape) == 1 else 0.02
        tensors[name] = (scale * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_hf_dict({"model_type": "sdar", "architectures": ["SDARForCausalLM"], "torch_dtype": args.dtype,
                             "mask_token_id": args.vocab - 1})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 0}, f)
    return sum(t.nbytes for t in tensors.values())


def run_child(argv: list[str]) -> tuple[float, int]:
    """Wall seconds (interpreter start included) and peak RSS of one conversion subprocess."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"child {argv} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        sys.exit(f"convert {argv} failed:\n{proc.stderr[-3000:]}")
    summary = [line for line in proc.stdout.splitlines() if " tensors, " in line]
    if summary:
        print(f"    {summary[-1]}")
    return seconds, result["peak_rss"]


def same_weights(a: str, b: str) -> bool:
    """Tensor-by-tensor byte comparison of two HF directories (one tensor of each in memory at a time)."""
    from safetensors import safe_open

    sys.path.insert(0, REPO)
    from gtpo_jax.hf_io import safetensors_files

    fa, fb = safetensors_files(a), safetensors_files(b)
    if sorted(fa) != sorted(fb):
        return False
    for name in fa:
        with safe_open(fa[name], "numpy") as x, safe_open(fb[name], "numpy") as y:
            tx, ty = x.get_tensor(name), y.get_tensor(name)
            if tx.dtype != ty.dtype or tx.shape != ty.shape or tx.tobytes() != ty.tobytes():
                return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--intermediate", type=int, default=None, help="default 3 x hidden")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tie", action="store_true", help="tie lm_head to the embedding (default: untied, as SDAR-8B)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the source's dtype")
    p.add_argument("--export-dtype", choices=("float32", "bfloat16"), default=None, help="orbax2hf --dtype")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--workdir", default=None, help="default: a temporary directory, removed afterwards")
    args = p.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    src, ckpt, out = (os.path.join(work, n) for n in ("hf", "ckpt", "out"))
    try:
        t = time.perf_counter()
        model_bytes = write_random_source(src, args)
        print(f"model: {model_bytes / 1e6:.0f} MB {args.dtype} (hidden {args.hidden}, {args.layers} layers, "
              f"vocab {args.vocab}, tied={args.tie}); source written in {time.perf_counter() - t:.1f} s")
        _, baseline = run_child(["baseline"])
        print(f"baseline (python + jax + orbax + gtpo_jax imported): peak RSS {baseline / 1e6:.0f} MB")
        export = ["--dtype", args.export_dtype] if args.export_dtype else []
        rows = []
        for label, argv in (("hf2orbax", ["hf2orbax", src, ckpt]),
                            ("orbax2hf", ["orbax2hf", ckpt, out, "--max-shard-size", args.max_shard_size, *export])):
            seconds, peak = run_child(argv)
            ratio = (peak - baseline) / model_bytes
            rows.append((label, seconds, peak, ratio))
            print(f"{label}: {seconds:.1f} s wall, peak RSS {peak / 1e6:.0f} MB, "
                  f"(peak - baseline) / model = {ratio:.2f}")
        if not args.export_dtype or args.export_dtype == args.dtype:
            print(f"round trip bit-exact: {same_weights(src, out)}")
        print(json.dumps({"model_bytes": model_bytes, "baseline_rss": baseline,
                          **{f"{r[0]}_{k}": v for r in rows for k, v in zip(("seconds", "peak_rss", "ratio"), r[1:])}}))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, REPO)
        child(sys.argv[2:])
    else:
        main()
