"""The CPU demo over several seeds: per seed, SFT once, then GTPO with the accuracy reward and
GTPO with accuracy + speed from that same SFT checkpoint. Prints (and writes to
<out>/summary.md) a table with every run's numbers, then their mean and range.

python scripts/demo_seeds.py --seeds 0 1 2 --out runs/seeds
python scripts/demo_seeds.py --task ramble --seeds 0 1 2 --out runs/seeds_ramble   # the speed reward's proof

`--task ramble` runs the same three stages on the task where right answers decode at two speeds
(README, "the speed reward"): 70% of the SFT solutions trail off after the boxed answer into random
marks (committed about one per forward), GTPO runs 150 steps, and the speed run weights its speed
part 16 (under SPEC's DAPO rule the speed part separates only a mixed group's right answers, so it
needs the weight and the steps to outpull accuracy's drift towards rambling).

A seed sets the model's initialisation and the training randomness (masks, rollouts) of both
stages; the synthetic questions (data.shuffle_seed) stay the same, so every seed is scored on the
same 200 held-out questions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from plot_metrics import plot, read_metrics  # noqa: E402

EDGE = 5  # steps averaged at the start and at the end of a GTPO run
# Overrides per task variant: for every stage ("all"), for both GTPO runs ("gtpo"), for the speed run ("speed").
TASKS = {
    "carry": {"all": [], "gtpo": [], "speed": []},
    "ramble": {"all": ["data.synthetic_ramble=0.7", "data.max_len=112", "decoding.max_new_tokens=52"],
               "gtpo": ["train.steps=150"], "speed": ["gtpo.rewards={accuracy: 1.0, speed: 16.0}"]},
}


def train(config: str, log_path: str, *overrides: str) -> tuple[dict, float]:
    """One stage in its own process on the CPU; (held-out accuracies it printed, wall seconds)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "gtpo_jax.train", "--config", config, *overrides], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"{config} failed (exit {proc.returncode}); see {log_path}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("held-out accuracy (%): "))
    return json.loads(line.split(": ", 1)[1]), time.time() - t0


def earlier_sft(root: str, seed: int) -> tuple[str, dict, float]:
    """(SFT run directory, held-out before / after, wall seconds) of `seed` in an earlier --out."""
    with open(os.path.join(root, "results.json")) as f:
        row = next((r for r in json.load(f) if r["run"].endswith(f" seed {seed}")), None)
    sft_dir = os.path.join(root, f"seed{seed}", "sft")
    if row is None or not os.path.isdir(os.path.join(sft_dir, "checkpoints")):
        raise SystemExit(f"--sft-root {root}: no SFT run of seed {seed} there; train it (drop --sft-root)")
    return sft_dir, {"before": row["sft_before"], "after": row["sft_after"]}, row["sft_wall_s"]


def edges(rows: list[dict], key: str) -> tuple[float, float]:
    """Mean of `key` over the first and the last EDGE steps that logged it."""
    values = [r[key] for r in sorted(rows, key=lambda r: r["step"]) if isinstance(r.get(key), (int, float))]
    return float(np.mean(values[:EDGE])), float(np.mean(values[-EDGE:]))


def gtpo_row(name: str, run_dir: str, held_out: dict, wall: float) -> dict:
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    plot([rows], os.path.join(run_dir, "curves.png"), title=name)
    acc0, acc1 = edges(rows, "accuracy")
    tpf0, tpf1 = edges(rows, "tokens_per_forward")
    return {"run": name, "held_out_before": held_out["before"], "held_out_after": held_out["after"],
            "held_out_all": held_out, "rollout_acc_first": acc0, "rollout_acc_last": acc1,
            "tpf_first": tpf0, "tpf_last": tpf1, "tpf_ratio": tpf1 / tpf0, "wall_s": wall}


def summary_table(results: list[dict]) -> str:
    cols = [("held-out before (%)", "held_out_before", "{:.1f}"), ("held-out after (%)", "held_out_after", "{:.1f}"),
            (f"rollout acc. first {EDGE} steps", "rollout_acc_first", "{:.3f}"),
            (f"rollout acc. last {EDGE} steps", "rollout_acc_last", "{:.3f}"),
            (f"tokens/forward first {EDGE}", "tpf_first", "{:.2f}"), (f"tokens/forward last {EDGE}", "tpf_last", "{:.2f}"),
            ("tokens/forward last / first", "tpf_ratio", "{:.3f}"),
            ("wall (s)", "wall_s", "{:.0f}")]
    lines = ["| run | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['run']} | " + " | ".join(fmt.format(r[k]) for _, k, fmt in cols) + " |")
    for kind in sorted({r["run"].split(" ")[0] for r in results}):
        group = [r for r in results if r["run"].split(" ")[0] == kind]
        cells = []
        for _, k, fmt in cols:
            v = np.array([r[k] for r in group])
            cells.append(f"{fmt.format(v.mean())} ({fmt.format(v.min())}–{fmt.format(v.max())})")
        lines.append(f"| **{kind}: mean (range), {len(group)} seeds** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--task", choices=sorted(TASKS), default="carry",
                    help="the demo's task (carry, default) or the speed reward's rambling variant")
    ap.add_argument("--out", help="output directory [runs/seeds, or runs/seeds_<task> for another task]")
    ap.add_argument("--skip-speed", action="store_true", help="only the accuracy-reward GTPO run")
    ap.add_argument("--sft-from", help="an SFT run directory to start every seed's GTPO runs from (no SFT per seed)")
    ap.add_argument("--sft-root", help="an earlier --out of this script: reuse its seed<N>/sft runs (and their "
                                       "results.json's SFT numbers) instead of training SFT again")
    args = ap.parse_args()
    task = TASKS[args.task]
    out = os.path.abspath(args.out or ("runs/seeds" if args.task == "carry" else f"runs/seeds_{args.task}"))
    results = []
    for seed in args.seeds:
        base = os.path.join(out, f"seed{seed}")
        os.makedirs(base, exist_ok=True)
        if args.sft_from:  # one SFT run shared by every seed's GTPO runs
            sft_dir, sft, sft_wall = args.sft_from, {"before": float("nan"), "after": float("nan")}, float("nan")
        elif args.sft_root:  # each seed's own SFT run, from an earlier run of this script
            sft_dir, sft, sft_wall = earlier_sft(os.path.abspath(args.sft_root), seed)
            print(f"seed {seed}: SFT reused from {sft_dir}: held-out {sft}", flush=True)
        else:
            sft_dir = os.path.join(base, "sft")
            sft, sft_wall = train("configs/sft_tiny.yaml", os.path.join(base, "sft.log"), f"output_dir={sft_dir}",
                                  f"model.init_seed={seed}", f"train.seed={seed}", "checkpoint.export_hf=false",
                                  *task["all"])
            print(f"seed {seed}: SFT held-out {sft} in {sft_wall:.0f} s", flush=True)
        runs = [("gtpo", "configs/gtpo_tiny.yaml")] + ([] if args.skip_speed else [("speed", "configs/gtpo_tiny_speed.yaml")])
        for name, config in runs:
            run_dir = os.path.join(base, name)
            held, wall = train(config, os.path.join(base, f"{name}.log"), f"output_dir={run_dir}",
                               f"model.path={sft_dir}/checkpoints", f"train.seed={seed}", "checkpoint.export_hf=false",
                               *task["all"], *task["gtpo"], *(task["speed"] if name == "speed" else []))
            row = gtpo_row(f"{name} seed {seed}", run_dir, held, wall)
            row.update(sft_before=sft["before"], sft_after=sft["after"], sft_wall_s=sft_wall)
            results.append(row)
            print(f"seed {seed}: {name} held-out {held}; rollout accuracy {row['rollout_acc_first']:.3f} -> "
                  f"{row['rollout_acc_last']:.3f}; tokens/forward {row['tpf_first']:.2f} -> {row['tpf_last']:.2f}; "
                  f"{wall:.0f} s", flush=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    table = summary_table(results)
    if not args.sft_from:
        sft_runs = sorted({(r["run"].split(" ")[-1], r["sft_wall_s"], r["sft_before"], r["sft_after"]) for r in results})
        reused = f" (reused from {args.sft_root})" if args.sft_root else ""
        table += "\n" + "\n".join(f"SFT seed {s}: held-out {b:.1f}% -> {a:.1f}% in {w:.0f} s{reused}"
                                   for s, w, b, a in sft_runs) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
