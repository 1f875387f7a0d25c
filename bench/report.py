"""Render benchmark results (JSON lines from bench.run) as a Markdown table and a bar plot.

    python -m bench.report bench/results/quick.jsonl --out bench/results/quick

writes ``DIR/table.md`` and ``DIR/scores.png``: mean ± standard deviation over training
seeds of the normalised score per (task, regime, N, algorithm), with the reward-recovery
correlations of the IRL methods, gradient steps and wall time.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def _stat(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def _corr(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return f"{np.mean(vals):.2f}" if vals else "–"


def run_key(row: dict) -> tuple:
    """One run of the benchmark: ``(task, regime, demos, N, algo, seed)`` (rows of protocol
    version 1 have full demonstrations); bench.run skips the runs already in its results file
    by this key."""
    return row["task"], row["regime"], row.get("demos", "full"), row["N"], row["algo"], row["seed"]


def group(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[run_key(row)[:5]].append(row)
    return dict(sorted(groups.items()))


def table(rows: list[dict]) -> str:
    lines = ["| task | regime | demos | N | algorithm | seeds | normalised score | reward corr. (mixed) | "
             "reward corr. (held-out expert) | return Spearman (mixed / medium) | updates | wall s (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (task, regime, demos, n, algo), cell in group(rows).items():
        spearman = f"{_corr([r.get('return_spearman_mixed') for r in cell])} / " \
                   f"{_corr([r.get('return_spearman_medium') for r in cell])}"
        lines.append(
            f"| {task} | {regime} | {demos} | {n} | {algo} | {len(cell)} | "
            f"{_stat([r['normalized_score'] for r in cell])} | "
            f"{_corr([r.get('reward_corr_mixed') for r in cell])} | "
            f"{_corr([r.get('reward_corr_heldout') for r in cell])} | {spearman} | {cell[0]['updates']} | "
            f"{np.mean([r['wall_s'] for r in cell]):.0f} |")
    machines = sorted({r["machine"] for r in rows})
    total = sum(r["wall_s"] for r in rows)
    lines += ["", f"Machine: {'; '.join(machines)}. Total training+evaluation wall time: {total / 60:.1f} min "
              f"over {len(rows)} runs."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    algos = sorted({key[4] for key in groups})
    cells = sorted({key[:4] for key in groups})
    width = 0.8 / max(len(algos), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(cells)), 4))
    for i, algo in enumerate(algos):
        means, stds = [], []
        for cell in cells:
            scores = [r["normalized_score"] for r in groups.get((*cell, algo), []) if r["normalized_score"] is not None]
            means.append(np.mean(scores) if scores else np.nan)
            stds.append(np.std(scores) if len(scores) > 1 else 0.0)
        ax.bar(np.arange(len(cells)) + i * width, means, width, yerr=stds, capsize=3, label=algo)
    ax.set_xticks(np.arange(len(cells)) + width * (len(algos) - 1) / 2)
    ax.set_xticklabels([f"{t}\n{r} {d} N={n}" for t, r, d, n in cells], fontsize=8)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("normalised score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="JSON-lines files written by bench.run (merged: e.g. "
                                                   "a tier and more seeds of its cells run later)")
    parser.add_argument("--out", required=True, help="folder for table.md and scores.png")
    args = parser.parse_args(argv)
    rows, seen = [], {}
    for path in args.results:
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            key = run_key(row)
            if key in seen:
                # Counting a seed twice would shrink the error bar and bias the mean.
                raise SystemExit(f"{path} repeats the run {key} already in {seen[key]}: pass each run once "
                                 "(drop one of the two rows or one of the files)")
            seen[key] = path
            rows.append(row)
    if not rows:
        raise SystemExit(f"{' '.join(args.results)} hold no results")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table(rows))
    plot(rows, out / "scores.png")
    print(table(rows))


if __name__ == "__main__":
    main()
