"""How much of a controller's score is the draw of its prior's fit: refit a kept cell's
acting prior from fresh draws and score each, per learning-rate schedule.

    python -m bench.refit_draws --manifest ../shared/experts/experts.json --data DATA \\
        --checkpoints CKPT --cells hopper:with-medium:sub20:1:0 --draws 4 \\
        --schedules constant cosine --results FILE

The cell's trained networks (Q, the reward, the encoder) stay as ``bench.run`` kept them;
only the prior that acting uses is fitted again, ``--draws`` times per schedule, each from
a fresh initialisation and minibatch stream seeded by the draw's index (the same seeds for
every schedule, so draw ``k`` of each schedule starts from the same weights and draws the
same minibatches). Where the cell refits (sparse demonstrations beside D), that is the
advantage-weighted refit to D, played untilted; elsewhere it is D_E's prior, tilted by Q.
With ``--relabel heldout`` whole demonstrations ask held-out pairs on every draw (both of the
choice's fits on that draw's schedule); where they keep D_E's prior, the kept one acts.
``--members K`` acts from the output average of K fits per draw (means and log-stds
averaged), each from its own seed: whether an ensemble narrows the spread over draws.
Each fit is scored on the protocol's episodes (``bench.run``'s ``EVAL_SEEDS``), one row per
draw; the printed line gives each schedule's mean and spread over its draws.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.acting import run_model
from bench.datasets import read_manifest
from bench.machine import machine
from bench.run import EVAL_SEEDS, ROOT, append_line, cell_data, git_commit
from bicql_lightning import RolloutEvaluation, TiltedPriorPolicy
from bicql_lightning.callbacks import refit_policy
from bicql_lightning.densities import GaussianPolicy

DRAW_SEED = 7919  # the draws' seeds are DRAW_SEED + k: apart from every training seed


def reinitialise(net: torch.nn.Module, seed: int) -> None:
    """Fresh default initialisation of every layer of ``net``, from ``seed``."""
    torch.manual_seed(seed)
    for layer in net.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


class AveragedGaussian(GaussianPolicy):
    """The output average of several fitted priors: their means and log-stds averaged, so
    acting (mode, candidates, densities) reads one Gaussian per state."""

    def __init__(self, members: list[GaussianPolicy]):
        torch.nn.Module.__init__(self)
        first = members[0]
        self.distribution, self.act_dim, self.log_std_bounds = first.distribution, first.act_dim, first.log_std_bounds
        self.members = torch.nn.ModuleList(members)
        self.register_buffer("action_center", first.action_center.clone())
        self.register_buffer("action_half", first.action_half.clone())

    def forward(self, obs):
        means, log_stds = zip(*(member(obs) for member in self.members))
        return torch.stack(means).mean(0), torch.stack(log_stds).mean(0)


def draw(model, data, k: int, schedule: str, members: int = 1) -> tuple[float, dict[str, float]]:
    """Normalised score of the cell's controller with its acting prior refitted from draw
    ``k`` (``members`` > 1: the output average of that many fits, each from its own seed)."""
    policy = model.policy
    policy.fit_schedule = schedule
    seeds = [DRAW_SEED + k] if members == 1 else [DRAW_SEED + 1000 * (k + 1) + j for j in range(members)]
    refit = policy.refits(data) or (policy.relabel == "heldout" and not data.offline_is_expert)
    metrics: dict[str, float] = {}
    fits = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        if refit:
            reinitialise(policy.relabeled_prior, seed)
            policy.relabeled.fill_(False)
            model._rng().set_state(generator.get_state())  # the refit draws from the module's stream
            metrics = refit_policy(model, data)
        else:
            reinitialise(policy.prior, seed)
            policy.fitted.fill_(False)
            policy.fit(data, generator)
        fits.append(copy.deepcopy(policy.relabeled_prior if bool(policy.relabeled) else policy.prior))
    if members > 1:
        if bool(policy.relabeled):
            policy.relabeled_prior = AveragedGaussian(fits).requires_grad_(False)
        else:
            policy.prior = AveragedGaussian(fits).requires_grad_(False)
    policy.revision += 1
    model.eval()
    result = RolloutEvaluation(every_n_updates=0, episodes=EVAL_SEEDS[1], seed=EVAL_SEEDS[0]).evaluate_module(model, data)
    return float(result["normalized_score"]), metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--checkpoints", required=True, help="bench.run's --checkpoints folder")
    parser.add_argument("--cells", nargs="+", required=True, metavar="TASK:REGIME:DEMOS:N:SEED")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--schedules", nargs="+", default=["constant", "cosine"], choices=["constant", "cosine"])
    parser.add_argument("--relabel", choices=["auto", "heldout"], default=None,
                        help="the controller's relabel rule for these draws (default: the checkpoint's)")
    parser.add_argument("--members", type=int, default=1,
                        help="act from the output average of this many fits per draw (each its own seed)")
    parser.add_argument("--results", required=True, help="JSON-lines file, one row per draw (appended to)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench" / "bicql.yaml"))
    args = parser.parse_args(argv)
    if args.draws < 1 or args.members < 1:
        parser.error("--draws and --members must be at least 1")
    if args.members > 1 and args.relabel == "heldout":
        parser.error("--members averages fits of one prior; with --relabel heldout each fit may pick another one")
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    tasks = {t.name: t for t in read_manifest(args.manifest)}
    config = yaml.safe_load(Path(args.config).read_text())
    for cell in args.cells:
        name, regime, demos, n, seed = cell.split(":")
        if name not in tasks:
            raise SystemExit(f"task {name!r} is not in {args.manifest} (it has {', '.join(tasks)})")
        task, n, seed = tasks[name], int(n), int(seed)
        data = cell_data(task, regime, n, seed, config, demos)
        data.setup("fit")
        scores: dict[str, list[float]] = {}
        for schedule in args.schedules:
            for k in range(args.draws):
                model, _ = run_model(task, regime, n, seed, config, demos, args.checkpoints, data=data)
                if not isinstance(model.policy, TiltedPriorPolicy):
                    raise SystemExit(f"{cell}: the kept controller is {type(model.policy).__name__}, not the default's")
                if args.relabel is not None:
                    model.policy.relabel = args.relabel
                start = time.perf_counter()
                score, metrics = draw(model, data, k, schedule, args.members)
                scores.setdefault(schedule, []).append(score)
                row = {"task": name, "regime": regime, "demos": demos, "N": n, "seed": seed, "draw": k,
                       "schedule": schedule, "relabel": args.relabel, "members": args.members,
                       "prior": "refit" if bool(model.policy.relabeled) else "expert",
                       "normalized_score": score, "wall_s": round(time.perf_counter() - start, 1),
                       **{key.replace("/", "_"): round(v, 5) for key, v in metrics.items()},
                       "commit": git_commit(), "machine": machine(gpu_used=False, threads=True)}
                append_line(Path(args.results), json.dumps(row))
                print(f"{cell} {schedule} x{args.members} draw {k}: {score:.1f} ({row['wall_s']} s)", flush=True)
        print(cell + "  " + "  ".join(f"{s}: {np.mean(v):.1f} ± {np.std(v):.1f} (min {min(v):.1f})"
                                      for s, v in scores.items()), flush=True)


if __name__ == "__main__":
    main()
