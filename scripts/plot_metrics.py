"""Plot training curves from a run's metrics.jsonl to a PNG.

python scripts/plot_metrics.py runs/tiny/gtpo/metrics.jsonl -o runs/tiny/gtpo/curves.png
"""

from __future__ import annotations

import argparse
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("reward_mean", "reward (mean)"),
    ("accuracy", "rollout accuracy"),
    ("eval/accuracy", "held-out accuracy"),
    ("response_len", "response length (tokens)"),
    ("tokens_per_forward", "tokens per forward"),
    ("loss", "loss"),
]


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted run
    return rows


def plot(rows: list[dict], out: str, title: str = "") -> list[str]:
    panels = [(k, label) for k, label in PANELS if any(k in r for r in rows)]
    if not panels:
        raise SystemExit("no known metric in the file (expected e.g. reward_mean, accuracy, loss)")
    cols = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(5 * cols, 3.4 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        # a resumed run appends: keep the last value written for each step
        pts = sorted(dict(pts).items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return [k for k, _ in panels]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", help="metrics.jsonl of a run")
    ap.add_argument("-o", "--output", default="curves.png")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    keys = plot(read_metrics(args.metrics), args.output, args.title)
    print(f"wrote {args.output} ({', '.join(keys)})")


if __name__ == "__main__":
    main()
