"""Plot training curves from one or more runs' metrics.jsonl to a PNG.

python scripts/plot_metrics.py runs/tiny/gtpo/metrics.jsonl -o runs/tiny/gtpo/curves.png
python scripts/plot_metrics.py runs/tiny/gtpo/metrics.jsonl runs/tiny/gtpo_speed/metrics.jsonl \\
    --labels accuracy accuracy+speed --keys tokens_per_forward eval/accuracy -o compare.png

With several files every panel overlays the runs (one colour per run). The `reward/*` parts of
a GTPO run share one panel.
"""

from __future__ import annotations

import argparse
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("accuracy", "rollout accuracy (T=1, every drawn group)"),
    ("eval/accuracy", "held-out accuracy (greedy)"),
    ("reward/*", "reward parts (mean, unweighted)"),
    ("reward_mean", "reward (mean)"),
    ("tokens_per_forward", "tokens per forward"),
    ("response_len", "response length (tokens)"),
    ("rollout_nll", "rollout NLL per token (entropy proxy)"),
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


def series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    pts = sorted(dict(pts).items())  # a resumed run appends: keep the last value written for each step
    return [p[0] for p in pts], [p[1] for p in pts]


def expand(key: str, runs: list[list[dict]]) -> list[str]:
    """`reward/*` -> every reward part present in any run; other keys as they are."""
    if not key.endswith("/*"):
        return [key] if any(key in r for rows in runs for r in rows) else []
    prefix = key[:-1]
    return sorted({k for rows in runs for r in rows for k in r if k.startswith(prefix)})


def plot(runs: list[list[dict]], out: str, title: str = "", labels: list[str] | None = None,
         keys: list[str] | None = None) -> list[str]:
    wanted = [(k, dict(PANELS).get(k, k)) for k in keys] if keys else PANELS
    panels = [(k, label, expand(k, runs)) for k, label in wanted]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise SystemExit("no known metric in the file (expected e.g. reward_mean, accuracy, loss)")
    labels = labels or [f"run {i + 1}" for i in range(len(runs))]
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.4 * rows_n), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (key, label, names) in zip(axes.flat, panels):
        for i, rows in enumerate(runs):
            for j, name in enumerate(names):
                x, y = series(rows, name)
                if not x:
                    continue
                parts = ([labels[i]] if len(runs) > 1 else []) + ([name.split("/", 1)[1]] if len(names) > 1 else [])
                ax.plot(x, y, styles[j % len(styles)] if len(runs) > 1 else "-",
                        color=colours[(i if len(runs) > 1 else j) % len(colours)],
                        marker="o" if len(x) < 30 else None, ms=3, label=", ".join(parts) or None)
        if len(runs) > 1 or len(names) > 1:
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    return [n for _, _, names in panels for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", nargs="+", help="metrics.jsonl of one or more runs")
    ap.add_argument("-o", "--output", default="curves.png")
    ap.add_argument("--title", default="")
    ap.add_argument("--labels", nargs="+", help="one name per run (legend)")
    ap.add_argument("--keys", nargs="+", help="panels to draw (default: all known ones present)")
    args = ap.parse_args()
    if args.labels and len(args.labels) != len(args.metrics):
        ap.error(f"--labels needs one name per metrics file ({len(args.metrics)}), got {len(args.labels)}")
    keys = plot([read_metrics(p) for p in args.metrics], args.output, args.title, args.labels, args.keys)
    print(f"wrote {args.output} ({', '.join(keys)})")


if __name__ == "__main__":
    main()
