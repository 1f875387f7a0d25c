"""Act again on the weights ``bench.run`` kept, with the current default controller.

    python -m bench.rescore --manifest ../shared/experts/experts.json --data DATA \\
        --checkpoints CKPT --rows bench/results/v2/full_demos_hopper.jsonl --out FILE

For a change in what happens after training, whether and how the prior is refitted to D
(:meth:`~bicql_lightning.TiltedPriorPolicy.refit`), the weights of a kept cell are those a new
training would give: the refit comes after the last update and reads nothing the updates
wrote but the networks and the module's random stream, which the checkpoint keeps. Each
BiCQL-ML row of ``--rows`` whose checkpoint is in ``--checkpoints`` and kept D_E's prior is
refitted as the current policy refits at the end of training (``FitPolicy``), from the
checkpoint's stream, which no refit consumed: exactly the refit a new training gives. Where
it now refits, the controller is scored on the protocol's episodes as ``bench.run`` scores
it, and the row is written to ``--out`` with the new score and return, the refit's metrics
and ``rescored`` (the previous score, what changed, the commit of the acting code); its
reward metrics and wall time are the training's, unchanged. Rows whose controller would not
change are skipped. A checkpoint that refitted whole demonstrations (``relabel: true``, the
default before ``auto``) returns to D_E's prior and is refitted as now from its stream, which
is past that earlier refit: the choice is then a later draw than a new training's, and the
row says so (``rescored.exact`` false; rerun the cell with ``bench.run`` for the exact one).
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
from bicql_lightning.callbacks import refit_policy


def rescore(row: dict, task, checkpoints: str, config: dict) -> tuple[dict | None, dict[str, float]]:
    """``row`` acted on with the current controller (None where it would not change) and the
    refit's metrics."""
    data = cell_data(task, row["regime"], row["N"], row["seed"], config, row["demos"])
    model, _ = run_model(task, row["regime"], row["N"], row["seed"], config, row["demos"], checkpoints, data=data)
    policy = model.policy
    if not isinstance(policy, TiltedPriorPolicy):
        return None, {}
    exact = True
    if bool(policy.relabeled):
        if policy.refits(data):
            return None, {}  # sparse demonstrations: refitted then as now
        # Whole demonstrations refitted under relabel: true. The stream is past that refit:
        # the choice is made again on a later draw, not the one a new training would use.
        policy.relabeled.fill_(False)
        policy.revision += 1
        exact = False
    metrics = refit_policy(model, data)
    if not bool(policy.relabeled) and exact:
        return None, metrics
    model.eval()
    result = RolloutEvaluation(every_n_updates=0, episodes=EVAL_SEEDS[1], seed=EVAL_SEEDS[0]).evaluate_module(model, data)
    if "policy/heldout_error_refit" in metrics:
        change = "whole demonstrations choose their prior on a held-out fifth of D_E's pairs (relabel: heldout): " + (
            "D's advantage-weighted refit acts" if bool(policy.relabeled) else "D_E's own prior acts, tilted by Q")
    else:
        change = "D's refit acts (relabel)" if bool(policy.relabeled) else "D_E's own prior acts, tilted by Q"
    new = {**row, "normalized_score": result["normalized_score"], "return": result["return"],
           "return_std": result["return_std"], **{k.replace("/", "_"): round(v, 5) for k, v in metrics.items()},
           "rescored": {"from_score": row["normalized_score"], "change": change, "commit": git_commit(),
                        "exact": exact}}
    return new, metrics


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
        new, metrics = rescore(row, tasks[row["task"]], args.checkpoints, config)
        cell = f"{row['task']} {row['regime']} {row['demos']} N={row['N']} seed={row['seed']}"
        errors = " ".join(f"{k.split('/')[-1]}={v:.4f}" for k, v in metrics.items() if "heldout" in k)
        if new is None:
            print(f"{cell}: unchanged {errors}".rstrip(), flush=True)
            continue
        append_line(Path(args.out), json.dumps(new))
        print(f"{cell}: {row['normalized_score']:.1f} -> {new['normalized_score']:.1f} {errors}".rstrip(), flush=True)


if __name__ == "__main__":
    main()
