"""The user's path, measured: a shipped config, run unchanged, against the benchmark's cell.

    python -m bench.replica --manifest ../shared/experts/experts.json --out /tmp/replica \\
        --results bench/results/quick.jsonl

With the package's own dataset tools it writes a local Minari dataset under the id
``mujoco/hopper/expert-v0`` (the id ``configs/hopper_expert_n1.yaml`` names; Minari's
remote one cannot be downloaded here): the benchmark's expert-n10 episodes (noise 0.5,
reset seeds 0..9), with the benchmark's reference returns, so that its first episode is
the benchmark's expert-n1 demonstration. Then it runs

    bicql fit --config configs/hopper_expert_n1.yaml

unchanged (``MINARI_DATASETS_PATH`` set to ``--out``), and prints one JSON line: the
config's final score next to the benchmark's hopper expert-only N = 1 rows of
each ``--results`` file (BiCQL-ML and BC, by seed). It also appends that line to ``--log`` if given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.datasets import EXPERT_NOISE, read_manifest, reference_returns
from bench.machine import machine
from bicql_lightning.datasets import collect_dataset

ROOT = Path(__file__).resolve().parents[1]
DATASET_ID = "mujoco/hopper/expert-v0"


def make_dataset(task, out: Path) -> None:
    os.environ["MINARI_DATASETS_PATH"] = str(out)
    rand, expert = reference_returns(task)
    collect_dataset(DATASET_ID, task.env_id, task.expert(EXPERT_NOISE), 10, seed=0, env_kwargs=task.env_kwargs or None,
                    ref_min_score=rand, ref_max_score=expert, overwrite=True, progress=False,
                    description="local replica: the benchmark's hopper expert-n10 episodes")


def benchmark_rows(path: Path) -> dict[str, dict[int, float]]:
    rows: dict[str, dict[int, float]] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("task") == "hopper" and row.get("regime") == "expert-only" and row.get("N") == 1:
            rows.setdefault(row["algo"], {})[row["seed"]] = row["normalized_score"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="Minari root for the local dataset and the run's logs")
    parser.add_argument("--results", nargs="+", default=[str(ROOT / "bench" / "results" / "quick.jsonl")],
                        help="benchmark results files whose hopper expert-only N = 1 rows to show beside it")
    parser.add_argument("--config", default=str(ROOT / "configs" / "hopper_expert_n1.yaml"))
    parser.add_argument("--log", help="append the JSON line to this file")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    task = {t.name: t for t in read_manifest(args.manifest)}["hopper"]
    make_dataset(task, out)
    env = {**os.environ, "MINARI_DATASETS_PATH": str(out)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bicql_lightning.cli", "fit", "--config", args.config],
                          cwd=out, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    summaries = sorted(out.glob("lightning_logs/**/rollout_summary.json"), key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not summaries:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"bicql fit failed (exit {proc.returncode})")
    summary = json.loads(summaries[-1].read_text())
    line = {"config": os.path.relpath(args.config, ROOT), "dataset": DATASET_ID,
            "normalized_score": summary["normalized_score"], "return": summary["return"],
            "updates": summary["updates"], "wall_s": round(wall, 1),
            "benchmark": {os.path.relpath(p, ROOT): benchmark_rows(Path(p)) for p in args.results}, "machine": machine(gpu_used=False, threads=True)}
    text = json.dumps(line)
    print(text, flush=True)
    if args.log:
        with open(args.log, "a") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
