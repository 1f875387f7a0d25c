"""Render benchmark results (JSON lines from bench.run) as a Markdown table and a bar plot.

    python -m bench.report bench/results/quick.jsonl --out bench/results/quick

writes ``DIR/table.md`` and ``DIR/scores.png``: mean ± standard deviation over training
seeds of the normalised score per (task, regime, N, algorithm), with the reward-recovery
correlations of the IRL methods, gradient steps and wall time; and ``DIR/summary.md``:
one line per cell with oracle IQL, BC, BC-all, BiCQL-ML and IQL on BiCQL-ML's reward side
by side, the reward-transfer ratio, and each protocol-v2 target the cell has, met or
missed by how much (judged on the seed means shown).
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


# The summary's columns and the plot's bar order: the oracle, the cloning baselines, the IRL
# method, and offline RL on its learned reward.
SUMMARY_ALGOS = ("iql_oracle", "bc", "bc_all", "bicql", "iql_transfer")
SUMMARY_NAMES = ("oracle IQL", "BC", "BC-all", "BiCQL-ML", "IQL on BiCQL-ML's reward")


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def targets(regime: str, demos: str, n: int, means: dict[str, float | None], spearman: tuple) -> list[str]:
    """The protocol-v2 targets of one cell (issue: BENCHMARK.md v2), each as "name: met" or
    "name: missed by x", on the seed means; a target whose inputs are not measured is left out."""
    out = []

    def check(name: str, value: float | None, bound: float | None) -> None:
        if value is None or bound is None:
            return
        out.append(f"{name}: met" if value >= bound else f"{name}: missed by {bound - value:.1f}")

    bicql, oracle = means.get("bicql"), means.get("iql_oracle")
    cloning = [means[a] for a in ("bc", "bc_all") if means.get(a) is not None]
    best = max(cloning) if cloning else None
    if regime.startswith("with-"):
        if demos == "sub20" and n == 1:
            check("BiCQL-ML ≥ 0.9 × oracle", bicql, None if oracle is None else 0.9 * oracle)
            if best is not None and best < 80:
                check("BiCQL-ML ≥ max(BC, BC-all) + 10", bicql, best + 10)
        elif demos == "full" and n == 1:
            check("BiCQL-ML ≥ max(BC, BC-all) − 3", bicql, None if best is None else best - 3)
        check("IQL on the reward ≥ 0.9 × oracle", means.get("iql_transfer"), None if oracle is None else 0.9 * oracle)
        mixed, medium = spearman
        if mixed is not None:
            out.append(f"Spearman mixed ≥ 0.9: {'met' if mixed >= 0.9 else f'missed by {0.9 - mixed:.2f}'}")
        if medium is not None:
            out.append(f"Spearman medium ≥ 0.8: {'met' if medium >= 0.8 else f'missed by {0.8 - medium:.2f}'}")
    elif regime == "expert-only" and demos == "full":
        if n == 1:
            check("BiCQL-ML ≥ BC − 3", bicql, None if means.get("bc") is None else means["bc"] - 3)
        elif n == 10:
            check("BiCQL-ML ≥ 95", bicql, 95.0)
    return out


def summary(rows: list[dict]) -> str:
    groups = group(rows)
    cells = sorted({key[:4] for key in groups})
    lines = ["| task | regime | demos | N | " + " | ".join(SUMMARY_NAMES) + " | transfer ratio | "
             "BiCQL-ML return Spearman (mixed / medium) | seeds | targets |",
             "|---|---|---|---|" + "---|" * len(SUMMARY_NAMES) + "---|---|---|---|"]
    for cell in cells:
        task, regime, demos, n = cell
        means = {a: _mean([r["normalized_score"] for r in groups.get((*cell, a), [])]) for a in SUMMARY_ALGOS}
        bicql_rows = groups.get((*cell, "bicql"), [])
        spearman = (_mean([r.get("return_spearman_mixed") for r in bicql_rows]),
                    _mean([r.get("return_spearman_medium") for r in bicql_rows]))
        ratio = (means["iql_transfer"] / means["iql_oracle"]
                 if means["iql_transfer"] is not None and means["iql_oracle"] else None)
        seeds = sorted({len(groups.get((*cell, a), [])) for a in SUMMARY_ALGOS if groups.get((*cell, a))})
        shown = [_stat([r["normalized_score"] for r in groups.get((*cell, a), [])]) for a in SUMMARY_ALGOS]
        lines.append(f"| {task} | {regime} | {demos} | {n} | " + " | ".join(shown) + " | "
                     f"{'–' if ratio is None else f'{ratio:.2f}'} | "
                     f"{'–' if spearman[0] is None else f'{spearman[0]:.2f}'} / "
                     f"{'–' if spearman[1] is None else f'{spearman[1]:.2f}'} | "
                     f"{'/'.join(map(str, seeds)) or '–'} | "
                     f"{'; '.join(targets(regime, demos, n, means, spearman)) or '–'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(rows)
    present = {key[4] for key in groups}
    algos = [a for a in SUMMARY_ALGOS if a in present] + sorted(present - set(SUMMARY_ALGOS))
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
    (out / "summary.md").write_text(summary(rows))
    plot(rows, out / "scores.png")
    print(table(rows))
    print(summary(rows))


if __name__ == "__main__":
    main()
