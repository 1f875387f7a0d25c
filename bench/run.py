"""Run the MuJoCo imitation benchmark's cells (shared/BENCHMARK.md), resumably.

    python -m bench.datasets --manifest ../shared/experts/experts.json --out DATA
    python -m bench.run --manifest ../shared/experts/experts.json --data DATA \\
        --tier quick --results bench/results/quick.jsonl

Each cell (task, regime, N, algorithm, seed) trains through the same LightningModules,
data module and YAML configs users get (``configs/bench/<algo>.yaml``, shared by every
task), evaluates the final weights deterministically on reset seeds 10000..10009, and
appends one JSON line to the results file. Cells already in the file are skipped, so a
tier can be resumed or split across machines and merged.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any
from importlib import metadata
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import yaml

from bench.datasets import read_manifest
from bench.machine import machine
from bench.report import run_key
from bicql_lightning import OfflineIRLDataModule, RolloutEvaluation, load_transitions
from bicql_lightning.precision import bf16_is_slow_on_cpu, is_bf16

ROOT = Path(__file__).resolve().parents[1]
# Benchmark protocol version 2. A cell is (regime, demonstrations, N): "full" demonstrations
# keep every transition, "sub20" every 20th (each whole); with-medium only where the manifest
# names a medium policy.
TIERS = {
    "quick": {"seeds": [0], "cells": [("expert-only", "full", 1), ("with-mixed", "sub20", 1),
                                      ("with-medium", "sub20", 1)],
              "algos": ["bicql", "bc", "bc_all", "iql_oracle", "iql_transfer"]},
    "full": {"seeds": [0, 1, 2], "cells": [("expert-only", "full", 1), ("expert-only", "full", 10),
                                           ("with-mixed", "full", 1), ("with-mixed", "sub20", 1),
                                           ("with-medium", "full", 1), ("with-medium", "sub20", 1)],
             "algos": ["bicql", "bc", "bc_all", "iqlearn", "iql_oracle", "iql_transfer"]},
}
SUBSAMPLE = {"full": None, "sub20": 20}
OFFLINE = {"with-mixed": "mixed", "with-medium": "medium"}
# Algorithms that need D to hold more than D_E.
ONLY_REGIMES = {algo: set(OFFLINE) for algo in ("bc_all", "iql_oracle", "iql_transfer")}
# Queue order for several processes (--claims): the longest cells first.
COST_RANK = {"bicql": 0, "iqlearn": 1}
# The config each algorithm trains with (configs/bench/<name>.yaml), where it is not its own name.
CONFIG_OF = {"iql_oracle": "iql", "iql_transfer": "iql"}
EVAL_SEEDS = (10000, 10)  # first seed, episodes
# The algorithms whose rewards are reused (iql_transfer, bench.transfer_online): their cells keep a checkpoint.
KEEP_CHECKPOINT = ("bicql", "iqlearn")
REWARD_CHUNK = 1 << 14  # transitions per forward pass when a dataset's rewards are scored


def git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):  # a copy of the tree without .git (e.g. a lent GPU machine)
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {}
    for name in ("bicql-lightning", "torch", "lightning", "minari", "gymnasium", "mujoco", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def instantiate(spec: dict, **extra):
    """A ``{class_path, init_args}`` block of a LightningCLI config."""
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**{**spec.get("init_args", {}), **extra})


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


@torch.no_grad()
def reward_correlation(model: pl.LightningModule, dataset_id: str) -> float | None:
    """Pearson correlation of the learned reward with the true one on every transition."""
    if not (hasattr(model, "reward_net") or hasattr(model, "reward")):
        return None
    t = load_transitions(dataset_id)
    learned = []
    # In chunks: IQ-Learn's reward reads V(s') over sampled actions, and all of a 100k-pair
    # dataset at once took 15 GB (a run beside others was killed for memory).
    for i in range(0, len(t.rewards), REWARD_CHUNK):
        part = [torch.as_tensor(x[i:i + REWARD_CHUNK], device=model.device)
                for x in (t.observations, t.actions, t.next_observations, t.terminations)]
        learned.append((model.reward_net(*part[:2]) if hasattr(model, "reward_net") else model.reward(*part))
                       .float().cpu().numpy())
    return pearson(np.concatenate(learned).astype(np.float64), t.rewards.astype(np.float64))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's of the ranks (tied values share their mean rank)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(np.asarray(x, float), return_inverse=True, return_counts=True)
        ends = np.cumsum(counts)
        return ((ends - counts + ends - 1) / 2.0)[inverse]
    return pearson(ranks(a), ranks(b))


@torch.no_grad()
def episode_return_correlation(model: pl.LightningModule, dataset_id: str) -> float | None:
    """Spearman correlation, over the episodes of ``dataset_id``, of each episode's learned
    return (the sum of r over its transitions) with its true return."""
    if not hasattr(model, "reward_net") or getattr(model, "model_name", "") == "IQL":
        return None
    t = load_transitions(dataset_id)
    learned = model.learned_rewards(torch.as_tensor(t.observations), torch.as_tensor(t.actions)).double().cpu().numpy()
    episodes = t.episode_ids.astype(np.int64)
    learned_returns = np.bincount(episodes, weights=learned)
    true_returns = np.bincount(episodes, weights=t.rewards.astype(np.float64))
    return spearman(learned_returns, true_returns)


def checkpoint_path(checkpoints: Path, task, regime: str, demos: str, n: int, seed: int, algo: str = "bicql") -> Path:
    """Where a BiCQL-ML (or IQ-Learn) cell's checkpoint is kept for training on its learned
    reward: IQL offline (iql_transfer) and SAC online (bench.transfer_online)."""
    return checkpoints / f"{algo}_{task.name}_{regime}_{demos}_n{n}_seed{seed}.ckpt"


def cell_data(task, regime: str, n: int, seed: int, config: dict, demos: str = "full") -> OfflineIRLDataModule:
    """The cell's data module (its generator seeded with the training seed)."""
    data_args = dict(config.get("data", {}))
    data_args.update(expert_dataset=task.dataset_id(f"expert-n{n}"),
                     offline_dataset=None if regime == "expert-only" else task.dataset_id(OFFLINE[regime]),
                     include_expert_in_offline=True, expert_subsample=SUBSAMPLE[demos], seed=seed)
    return OfflineIRLDataModule(**data_args)


def train_cell(task, regime: str, n: int, seed: int, config: dict, demos: str = "full"):
    """Train one cell and evaluate its final weights: ``(model, trainer, evaluation, wall seconds)``."""
    pl.seed_everything(seed, verbose=False)
    dm = cell_data(task, regime, n, seed, config, demos)
    model = instantiate(config["model"], spaces=dm.spaces)
    evaluation = RolloutEvaluation(every_n_updates=0, episodes=EVAL_SEEDS[1], seed=EVAL_SEEDS[0])
    trainer_args = dict(config.get("trainer", {}))
    callbacks = [instantiate(cb) for cb in trainer_args.pop("callbacks", [])] + [evaluation]
    trainer = pl.Trainer(**trainer_args, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, dm)
    return model, trainer, evaluation, time.perf_counter() - start


def run_cell(task, regime: str, n: int, algo: str, seed: int, config: dict, demos: str = "full",
             checkpoints: Path | None = None) -> dict:
    if algo == "iql_transfer":
        source = checkpoint_path(checkpoints, task, regime, demos, n, seed)
        config = {**config, "model": {**config["model"], "init_args": {**config["model"].get("init_args", {}),
                                                                       "reward": str(source)}}}
    model, trainer, evaluation, wall = train_cell(task, regime, n, seed, config, demos)
    if algo in KEEP_CHECKPOINT and checkpoints is not None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(checkpoint_path(checkpoints, task, regime, demos, n, seed, algo))
    return cell_row(task, regime, demos, n, algo, seed, config, model, evaluation.last, wall, int(trainer.global_step))


def run_cells_batched(task, regime: str, n: int, seeds: list[int], config: dict, demos: str = "full",
                      checkpoints: Path | None = None) -> list[dict]:
    """BiCQL-ML's cell for several seeds at once (``--batch-seeds``): the replicas are built
    and seeded as :func:`train_cell` builds each, trained as one batched computation
    (``bicql_lightning.seeds.fit_seeds``, float32, on the config's accelerator), then each is
    evaluated, kept and recorded as its own run; ``wall_s`` is the batch's wall time over K."""
    from bicql_lightning.seeds import fit_seeds, save_checkpoint

    trainer_args = dict(config.get("trainer", {}))
    device = torch.device("cuda" if trainer_args.get("accelerator") in ("gpu", "cuda") else "cpu")
    tau = next((cb.get("init_args", {}).get("tau", 0.005) for cb in trainer_args.get("callbacks", [])
                if cb["class_path"].endswith("TargetNetworkUpdate")), 0.005)
    models, dms = [], []
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        dms.append(cell_data(task, regime, n, seed, config, demos))
        models.append(instantiate(config["model"], spaces=dms[-1].spaces).to(device))
    updates = int(trainer_args.get("max_epochs", 1)) * int(config.get("data", {}).get("batches_per_epoch", 1000))
    start = time.perf_counter()
    fit_seeds(models, dms, seeds, updates, tau=tau)
    wall = (time.perf_counter() - start) / len(seeds)
    config = {**config, "trainer": {**trainer_args, "precision": "32-true"}, "batch_seeds": len(seeds)}
    rows = []
    for seed, model, dm in zip(seeds, models, dms):
        result = RolloutEvaluation(every_n_updates=0, episodes=EVAL_SEEDS[1], seed=EVAL_SEEDS[0]).evaluate_module(model, dm)
        if checkpoints is not None:
            checkpoints.mkdir(parents=True, exist_ok=True)
            save_checkpoint(model, str(checkpoint_path(checkpoints, task, regime, demos, n, seed)))
        rows.append(cell_row(task, regime, demos, n, "bicql", seed, config, model, result, wall, 2 * updates))
    return rows


def cell_row(task, regime: str, demos: str, n: int, algo: str, seed: int, config: dict, model, result: dict,
             wall: float, optimizer_steps: int) -> dict:
    """The results file's line for one trained and evaluated cell."""
    trainer_args = config.get("trainer", {})
    irl = getattr(model, "model_name", "") != "IQL"
    return {
        "task": task.name, "env_id": task.env_id, "regime": regime, "demos": demos, "N": n, "algo": algo,
        "seed": seed, "normalized_score": result["normalized_score"], "return": result["return"],
        "return_std": result["return_std"], "expert_return": result["expert_return"],
        "random_return": result["random_return"],
        "reward_corr_mixed": reward_correlation(model, task.dataset_id("mixed")) if irl else None,
        "reward_corr_medium": (reward_correlation(model, task.dataset_id("medium"))
                               if irl and task.medium_file is not None else None),
        "reward_corr_heldout": reward_correlation(model, task.dataset_id("heldout-expert")) if irl else None,
        "return_spearman_mixed": episode_return_correlation(model, task.dataset_id("mixed")),
        "return_spearman_medium": (episode_return_correlation(model, task.dataset_id("medium"))
                                   if task.medium_file is not None else None),
        "updates": int(model.updates), "optimizer_steps": optimizer_steps, "wall_s": round(wall, 1),
        "machine": machine(gpu_used=trainer_args.get("accelerator") in ("gpu", "cuda"), threads=True),
        "config": config, "versions": versions(), "commit": git_commit(), "protocol": 2,
    }


def append_line(path: Path, line: str) -> None:
    """One ``write`` in append mode, so that processes sharing the file never interleave rows."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def in_tier(tier: str | None, regime: str, demos: str, n: int, algo: str, seed: int) -> bool:
    if tier is None:
        return False
    spec = TIERS[tier]
    return (regime, demos, n) in spec["cells"] and algo in spec["algos"] and seed in spec["seeds"]


def parse_cell(text: str) -> tuple[str, str, int]:
    """``"with-mixed:sub20:1"`` -> ``("with-mixed", "sub20", 1)``; ``"expert-only:1"``: full demonstrations."""
    parts = text.split(":")
    if len(parts) == 2:
        parts = [parts[0], "full", parts[1]]
    if len(parts) != 3 or not parts[2].isdigit() or parts[1] not in SUBSAMPLE or not parts[0]:
        raise argparse.ArgumentTypeError(f"a cell is REGIME[:full|sub20]:N (e.g. with-mixed:sub20:1), got {text!r}")
    return parts[0], parts[1], int(parts[2])


def choose_precision(trainer: dict, requested: str, slow_bf16: Callable[[], bool] | None = None) -> str | None:
    """The precision a cell trains with: ``requested``, or for ``"auto"`` the config's, except
    that bf16 on a CPU without bf16 arithmetic (``slow_bf16()``, asked only then) becomes
    ``"32-true"``: the same training in float32, at its speed instead of a software-emulated
    bf16's (many times slower; bicql_lightning/precision.py; ``slow_bf16`` defaults to its
    measurement). ``None``: the config names none and none was requested."""
    configured = trainer.get("precision")
    if requested != "auto":
        return requested
    on_cpu = trainer.get("accelerator", "cpu") == "cpu"
    slow_bf16 = bf16_is_slow_on_cpu if slow_bf16 is None else slow_bf16
    return "32-true" if on_cpu and is_bf16(configured) and slow_bf16() else configured


def set_precision(trainer: dict, requested: str) -> str | None:
    """Write :func:`choose_precision`'s pick into a config's ``trainer`` block; returns the
    precision the config named."""
    configured = trainer.get("precision")
    precision = choose_precision(trainer, requested)
    if precision is not None:
        trainer["precision"] = precision
    return configured


def claim(path: Path) -> bool:
    """True for the one process that creates ``path``."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def plan_cells(tasks, tier: dict, algos, seeds, cells, done: set, exclude_tier: str | None) -> list[tuple]:
    """The ``(task, regime, demos, N, algo, seed)`` runs still to do: the tier's cells (or ``cells``
    of them) for ``algos`` and ``seeds`` (default: the tier's), minus those in ``done``; with-medium
    only for tasks with a medium policy. In the tier's algorithm order, so a BiCQL-ML cell comes
    before the IQL run on its reward."""
    return [(task, regime, demos, n, algo, seed) for task in tasks for regime, demos, n in tier["cells"]
            if cells is None or (regime, demos, n) in cells
            if regime != "with-medium" or getattr(task, "medium_file", None) is not None
            for algo in algos or tier["algos"] for seed in (tier["seeds"] if seeds is None else seeds)
            if (task.name, regime, demos, n, algo, seed) not in done
            and regime in ONLY_REGIMES.get(algo, {regime})
            and not in_tier(exclude_tier, regime, demos, n, algo, seed)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--tier", choices=sorted(TIERS), default="quick")
    parser.add_argument("--results", required=True, help="JSON-lines file (appended to; resumable)")
    parser.add_argument("--algos", nargs="*", default=None)
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--configs", default=str(ROOT / "configs" / "bench"), help="folder of <algo>.yaml")
    parser.add_argument("--seeds", nargs="*", type=int, default=None,
                        help="the seeds to run instead of the tier's (e.g. 3 4 5 for more seeds of its cells)")
    parser.add_argument("--cells", nargs="*", type=parse_cell, default=None, metavar="REGIME[:DEMOS]:N",
                        help="a subset of the tier's cells, e.g. expert-only:1 with-mixed:sub20:1")
    parser.add_argument("--checkpoints", default=None,
                        help="folder for the BiCQL-ML and IQ-Learn cells' checkpoints that iql_transfer and "
                             "bench.transfer_online train on "
                             "(default: beside --results)")
    parser.add_argument("--accelerator", default=None,
                        help="overrides the configs' trainer.accelerator (e.g. gpu); recorded in each row")
    parser.add_argument("--precision", default="auto",
                        help="trainer.precision for every cell (e.g. 32-true, bf16-mixed); 'auto' (default) keeps "
                             "the config's, except bf16 on a CPU without bf16 arithmetic, which trains in "
                             "32-true; recorded in each row's config")
    parser.add_argument("--exclude-tier", choices=sorted(TIERS), default=None,
                        help="skip the cells of this tier (e.g. the full tier's remainder after a quick "
                             "tier run elsewhere)")
    parser.add_argument("--claims", default=None,
                        help="folder shared by several bench.run processes on one machine: each cell is "
                             "claimed by one (a file created exclusively) and skipped by the others")
    parser.add_argument("--batch-seeds", action="store_true",
                        help="train each BiCQL-ML cell's seeds together, as one batched computation "
                             "(bicql_lightning.seeds; float32, on the config's accelerator), after the other cells: "
                             "for a GPU, where one seed's update is bound by kernel launches (docs/benchmark.md)")
    args = parser.parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    tier = TIERS[args.tier]
    unknown = set(args.cells or []) - set(tier["cells"])
    if unknown:
        parser.error(f"--cells {sorted(unknown)} are not in the {args.tier} tier's cells {tier['cells']}")
    tasks = [t for t in read_manifest(args.manifest) if args.tasks is None or t.name in args.tasks]
    results = Path(args.results)
    done = set()
    if results.exists():
        done = {run_key(json.loads(line)) for line in results.read_text().splitlines() if line.strip()}
    results.parent.mkdir(parents=True, exist_ok=True)
    claims = Path(args.claims) if args.claims else None
    if claims is not None:
        claims.mkdir(parents=True, exist_ok=True)
    cells = plan_cells(tasks, tier, args.algos, args.seeds, args.cells, done, args.exclude_tier)
    if claims is not None:
        # Several processes drain one queue: the longest cells first, so none is left alone at the end.
        cells.sort(key=lambda c: (c[4] == "iql_transfer", c[1] == "expert-only", -c[3],
                                  COST_RANK.get(c[4], len(COST_RANK))))
    checkpoints = Path(args.checkpoints) if args.checkpoints else results.parent / "checkpoints"
    if args.batch_seeds:  # BiCQL-ML's cells first, a cell's seeds at once (iql_transfer needs their checkpoints)
        batched: dict[tuple, tuple[Any, list[int]]] = {}  # (task name, regime, demos, N) -> (task, seeds)
        for task, regime, demos, n, algo, seed in cells:
            if algo == "bicql" and (claims is None or claim(claims / f"{task.name}_{regime}_{demos}_{n}_{algo}_{seed}")):
                batched.setdefault((task.name, regime, demos, n), (task, []))[1].append(seed)
        cells = [cell for cell in cells if cell[4] != "bicql"]
        for (_, regime, demos, n), (task, seeds) in batched.items():
            config = yaml.safe_load((Path(args.configs) / "bicql.yaml").read_text())
            if args.accelerator:
                config.setdefault("trainer", {})["accelerator"] = args.accelerator
            for row in run_cells_batched(task, regime, n, seeds, config, demos, checkpoints):
                report(results, row)
    for task, regime, demos, n, algo, seed in cells:
        # Before the claim: a cell skipped for a checkpoint that another process is still training stays free.
        if algo == "iql_transfer" and not checkpoint_path(checkpoints, task, regime, demos, n, seed).exists():
            print(f"{task.name} {regime} {demos} N={n} iql_transfer seed={seed}: skipped, no BiCQL-ML checkpoint "
                  f"of that cell in {checkpoints} (run its bicql cell first)", flush=True)
            continue
        if claims is not None and not claim(claims / f"{task.name}_{regime}_{demos}_{n}_{algo}_{seed}"):
            continue
        config = yaml.safe_load((Path(args.configs) / f"{CONFIG_OF.get(algo, algo)}.yaml").read_text())
        trainer = config.setdefault("trainer", {})
        if args.accelerator:
            trainer["accelerator"] = args.accelerator
        configured = set_precision(trainer, args.precision)
        if trainer.get("precision") != configured:
            print(f"{task.name} {regime} {demos} N={n} {algo} seed={seed}: trainer.precision {trainer['precision']} instead "
                  f"of the config's {configured}" + (" (no bf16 arithmetic on this CPU)"
                                                     if args.precision == "auto" else ""), flush=True)
        row = run_cell(task, regime, n, algo, seed, config, demos, checkpoints)
        report(results, row)


def report(results: Path, row: dict) -> None:
    """Append a finished cell's row and print its line."""
    append_line(results, json.dumps(row))
    print(f"{row['task']} {row['regime']} {row['demos']} N={row['N']} {row['algo']} seed={row['seed']}: "
          f"score={row['normalized_score']:.1f} corr_mixed={row['reward_corr_mixed']} updates={row['updates']} "
          f"wall={row['wall_s']}s", flush=True)


if __name__ == "__main__":
    main()
