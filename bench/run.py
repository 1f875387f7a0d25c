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
TIERS = {
    "quick": {"seeds": [0], "cells": [("expert-only", 1), ("expert-only", 10), ("with-mixed", 1)],
              "algos": ["bicql", "bc", "bc_all"]},
    "full": {"seeds": [0, 1, 2], "cells": [("expert-only", 1), ("expert-only", 10), ("with-mixed", 1),
                                           ("with-mixed", 10)], "algos": ["bicql", "bc", "bc_all", "iqlearn"]},
}
# BC on all of D differs from BC on D_E only where D holds more than D_E.
ONLY_REGIMES = {"bc_all": {"with-mixed"}}
# Queue order for several processes (--claims): the longest cells first.
COST_RANK = {"bicql": 0, "iqlearn": 1}
EVAL_SEEDS = (10000, 10)  # first seed, episodes


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
    t = load_transitions(dataset_id)
    obs = torch.as_tensor(t.observations, device=model.device)
    act = torch.as_tensor(t.actions, device=model.device)
    if hasattr(model, "reward_net"):
        learned = model.reward_net(obs, act)
    elif hasattr(model, "reward"):
        learned = model.reward(obs, act, torch.as_tensor(t.next_observations, device=model.device),
                               torch.as_tensor(t.terminations, device=model.device))
    else:
        return None
    return pearson(learned.float().cpu().numpy().astype(np.float64), t.rewards.astype(np.float64))


def train_cell(task, regime: str, n: int, seed: int, config: dict):
    """Train one cell and evaluate its final weights: ``(model, trainer, evaluation, wall seconds)``."""
    pl.seed_everything(seed, verbose=False)
    data_args = dict(config.get("data", {}))
    data_args.update(expert_dataset=task.dataset_id(f"expert-n{n}"),
                     offline_dataset=None if regime == "expert-only" else task.dataset_id("mixed"),
                     include_expert_in_offline=True, seed=seed)
    dm = OfflineIRLDataModule(**data_args)
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


def run_cell(task, regime: str, n: int, algo: str, seed: int, config: dict) -> dict:
    model, trainer, evaluation, wall = train_cell(task, regime, n, seed, config)
    trainer_args = config.get("trainer", {})
    result = evaluation.last
    return {
        "task": task.name, "env_id": task.env_id, "regime": regime, "N": n, "algo": algo, "seed": seed,
        "normalized_score": result["normalized_score"], "return": result["return"],
        "return_std": result["return_std"], "expert_return": result["expert_return"],
        "random_return": result["random_return"],
        "reward_corr_mixed": reward_correlation(model, task.dataset_id("mixed")),
        "reward_corr_heldout": reward_correlation(model, task.dataset_id("heldout-expert")),
        "updates": int(model.updates), "optimizer_steps": int(trainer.global_step), "wall_s": round(wall, 1),
        "machine": machine(gpu_used=trainer_args.get("accelerator") in ("gpu", "cuda"), threads=True),
        "config": config, "versions": versions(), "commit": git_commit(),
    }


def append_line(path: Path, line: str) -> None:
    """One ``write`` in append mode, so that processes sharing the file never interleave rows."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def in_tier(tier: str | None, regime: str, n: int, algo: str, seed: int) -> bool:
    if tier is None:
        return False
    spec = TIERS[tier]
    return (regime, n) in spec["cells"] and algo in spec["algos"] and seed in spec["seeds"]


def parse_cell(text: str) -> tuple[str, int]:
    """``"with-mixed:1"`` -> ``("with-mixed", 1)``."""
    regime, sep, n = text.rpartition(":")
    if not sep or not n.isdigit():
        raise argparse.ArgumentTypeError(f"a cell is REGIME:N (e.g. expert-only:1), got {text!r}")
    return regime, int(n)


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
    """The ``(task, regime, N, algo, seed)`` runs still to do: the tier's cells (or ``cells`` of
    them) for ``algos`` and ``seeds`` (default: the tier's), minus those in ``done``."""
    return [(task, regime, n, algo, seed) for task in tasks for regime, n in tier["cells"]
            if cells is None or (regime, n) in cells
            for algo in algos or tier["algos"] for seed in (tier["seeds"] if seeds is None else seeds)
            if (task.name, regime, n, algo, seed) not in done
            and regime in ONLY_REGIMES.get(algo, {regime})
            and not in_tier(exclude_tier, regime, n, algo, seed)]


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
    parser.add_argument("--cells", nargs="*", type=parse_cell, default=None, metavar="REGIME:N",
                        help="a subset of the tier's (regime, N) cells, e.g. expert-only:1 with-mixed:1")
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
        cells.sort(key=lambda c: (c[1] != "with-mixed", -c[2], COST_RANK.get(c[3], len(COST_RANK))))
    for task, regime, n, algo, seed in cells:
        if claims is not None and not claim(claims / f"{task.name}_{regime}_{n}_{algo}_{seed}"):
            continue
        config = yaml.safe_load((Path(args.configs) / f"{algo}.yaml").read_text())
        trainer = config.setdefault("trainer", {})
        if args.accelerator:
            trainer["accelerator"] = args.accelerator
        configured = set_precision(trainer, args.precision)
        if trainer.get("precision") != configured:
            print(f"{task.name} {regime} N={n} {algo} seed={seed}: trainer.precision {trainer['precision']} instead "
                  f"of the config's {configured}" + (" (no bf16 arithmetic on this CPU)"
                                                     if args.precision == "auto" else ""), flush=True)
        row = run_cell(task, regime, n, algo, seed, config)
        append_line(results, json.dumps(row))
        print(f"{task.name} {regime} N={n} {algo} seed={seed}: score={row['normalized_score']:.1f} "
              f"corr_mixed={row['reward_corr_mixed']} updates={row['updates']} wall={row['wall_s']}s", flush=True)


if __name__ == "__main__":
    main()
