"""Act again on the weights ``bench.run`` kept, with the current default controller.

    python -m bench.rescore --manifest ../shared/experts/experts.json --data DATA \\
        --checkpoints CKPT --rows bench/results/v2/full_demos_hopper.jsonl --out FILE

For a change that happens after training, whether the prior is refitted to D
(:meth:`~bicql_lightning.TiltedPriorPolicy.refits`), the weights of a kept cell are those a
new training would give: the refit comes after the last update and reads nothing the
updates wrote but the networks. Each BiCQL-ML row of ``--rows`` whose checkpoint is in
``--checkpoints`` is loaded; where the current policy no longer refits on the cell's data,
the controller returns to D_E's prior (tilted by Q at the policy's temperature) and is scored
on the protocol's episodes as ``bench.run`` scores it. The row is written to ``--out`` with
the new score and return and ``rescored`` (the previous score, what changed, the commit of
the acting code); its reward metrics and wall time are the training's, unchanged. Rows
whose controller would not change are skipped; a cell the current policy would refit but
its checkpoint did not is refused (that needs training's random state: rerun ``bench.run``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from bench.acting import run_model
from bench.datasets import read_manifest
from bench.run import EVAL_SEEDS, ROOT, append_line, cell_data, git_commit
from bicql_lightning import RolloutEvaluation, TiltedPriorPolicy


def rescore(row: dict, task, checkpoints: str, config: dict) -> dict | None:
    """``row`` acted on with the current controller, or None where it would not change."""
    data = cell_data(task, row["regime"], row["N"], row["seed"], config, row["demos"])
    model, _ = run_model(task, row["regime"], row["N"], row["seed"], config, row["demos"], checkpoints, data=data)
    policy = model.policy
    if not isinstance(policy, TiltedPriorPolicy):
        return None
    refitted, refits = bool(policy.relabeled), policy.refits(data)
    if refitted == refits:
        return None
    if refits:
        raise SystemExit(f"{task.name} {row['regime']} {row['demos']} seed {row['seed']}: the current policy refits "
                         "this cell's prior and its checkpoint holds none; rerun the cell with bench.run")
    policy.relabeled.fill_(False)
    policy.revision += 1
    model.eval()
    result = RolloutEvaluation(every_n_updates=0, episodes=EVAL_SEEDS[1], seed=EVAL_SEEDS[0]).evaluate_module(model, data)
    change = "D_E's whole demonstrations: its own prior acts, tilted by Q (relabel: auto), not D's refit"
    return {**row, "normalized_score": result["normalized_score"], "return": result["return"],
            "return_std": result["return_std"],
            "rescored": {"from_score": row["normalized_score"], "change": change, "commit": git_commit()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--checkpoints", required=True, help="bench.run's --checkpoints folder")
    parser.add_argument("--rows", required=True, help="results file whose BiCQL-ML rows are acted on again")
    parser.add_argument("--out", required=True, help="JSON-lines file the rescored rows are appended to")
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench" / "bicql.yaml"))
    args = parser.parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    tasks = {t.name: t for t in read_manifest(args.manifest)}
    config = yaml.safe_load(Path(args.config).read_text())
    for line in Path(args.rows).read_text().splitlines():
        row = json.loads(line)
        if row.get("algo") != "bicql" or row["task"] not in tasks:
            continue
        new = rescore(row, tasks[row["task"]], args.checkpoints, config)
        cell = f"{row['task']} {row['regime']} {row['demos']} N={row['N']} seed={row['seed']}"
        if new is None:
            print(f"{cell}: unchanged", flush=True)
            continue
        append_line(Path(args.out), json.dumps(new))
        print(f"{cell}: {row['normalized_score']:.1f} -> {new['normalized_score']:.1f}", flush=True)


if __name__ == "__main__":
    main()
