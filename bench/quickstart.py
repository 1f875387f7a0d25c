"""Quickstart benchmark: wall time and normalised score of `bicql fit --config ...`.

Runs the real CLI in a subprocess, as a user would, with a fresh Minari root so that
making the datasets is part of the measured time, once per training seed. Prints one
line per run and a summary line, and writes the results as JSON.

    python -m bench.quickstart --seeds 0 1 2 --out bench/results/quickstart.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def run_once(config: str, seed: int, workdir: Path, fresh_data: bool, shared_root: Path) -> dict:
    env = dict(os.environ)
    env["MINARI_DATASETS_PATH"] = str(workdir / "minari" if fresh_data else shared_root)
    logdir = workdir / f"logs-seed{seed}"
    cmd = [str(Path(sys.executable).with_name("bicql")), "fit", "--config", config,
           "--seed_everything", str(seed), "--trainer.default_root_dir", str(logdir),
           "--trainer.enable_progress_bar", "false"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(Path(glob.glob(str(logdir / "**" / "rollout_summary.json"), recursive=True)[0]).read_text())
    return {"seed": seed, "wall_s": round(wall, 1), "fresh_datasets": fresh_data, **summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for i, seed in enumerate(args.seeds):
            # The first run makes the datasets from scratch (what a fresh machine pays);
            # later runs reuse them, as a user's second run would.
            run = run_once(args.config, seed, tmp_path, fresh_data=False, shared_root=tmp_path / "minari")
            run["fresh_datasets"] = i == 0
            runs.append(run)
            print(f"quickstart seed={seed} wall={run['wall_s']}s return={run['return']:.1f} "
                  f"expert={run['expert_return']:.1f} random={run['random_return']:.1f} "
                  f"score={run['normalized_score']:.1f} updates={run['updates']} "
                  f"updates/s={run['updates_per_sec']:.1f}", flush=True)
    scores = [r["normalized_score"] for r in runs]
    walls = [r["wall_s"] for r in runs]
    line = (f"quickstart {args.config}: score min={min(scores):.1f} mean={sum(scores) / len(scores):.1f} "
            f"wall max={max(walls):.1f}s runs={len(runs)} machine='{cpu_model()}' cores={os.cpu_count()}")
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"config": args.config, "cpu": cpu_model(), "cores": os.cpu_count(),
                                              "runs": runs, "summary": line}, indent=2) + "\n")


if __name__ == "__main__":
    main()
