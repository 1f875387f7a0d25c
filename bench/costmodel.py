"""Cost model of a BiCQL-ML training iteration: time against batch size and network
width, and where the time goes.

    python -m bench.costmodel --data DATA --task hopper --out bench/results/costmodel.json

On ``bench/<task>/expert-n10-v0`` with the settings of ``configs/bench/bicql.yaml``
(through ``bench.throughput.benchmark_settings``), ``Trainer.fit`` runs ``--updates``
iterations per configuration; wall-clock timers wrapped around the module's own methods
split each iteration into

* sampling: the data module's ``sample_batch`` (index draws and gathers);
* target soft value: :math:`\\bar V(s')` under the target network (no gradient);
* Q update: ``q_objective`` (forward), its backward pass and the Adam step;
* reward update: ``reward_objective``, its backward pass and the Adam step;
* logging: ``log_dict`` and the logger's writes (every ``log_every_n_steps``);
* other: the rest (Lightning's loop and hooks, target network sync, counters).

Printed as a Markdown table (the README's cost model) and saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from bench.throughput import benchmark_settings
from bicql_lightning import BiCQLML, OfflineIRLDataModule, TargetNetworkUpdate

PARTS = ("sampling", "target soft value", "Q update", "reward update", "logging")


class _Clock:
    """Wall time spent inside wrapped callables, by part, after ``warmup`` iterations."""

    def __init__(self, warmup: int):
        self.warmup, self.total = warmup, defaultdict(float)
        self.iterations, self.started = 0, None

    def wrap(self, part, fn):
        def timed(*args, **kwargs):
            if self.iterations < self.warmup:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[part(args) if callable(part) else part] += time.perf_counter() - start
        return timed


class _Iterations(pl.Callback):
    def __init__(self, clock: _Clock):
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.iterations += 1
        if self.clock.iterations == self.clock.warmup:
            self.clock.started = time.perf_counter()


def profile(dataset_id: str, batch: int, width: int, updates: int, warmup: int) -> dict:
    model_kwargs, precision = benchmark_settings()
    model_kwargs.update(hidden_sizes=[width, width], reward_hidden_sizes=[width, width], proposal_fit_steps=100)
    dm = OfflineIRLDataModule(expert_dataset=dataset_id, offline_dataset=None, batch_size=batch,
                              batches_per_epoch=warmup + updates)
    model = BiCQLML(spaces=dm.spaces, **model_kwargs)
    clock = _Clock(warmup)
    q_objective, reward_objective = model.q_objective, model.reward_objective
    dm.sample_batch = clock.wrap("sampling", dm.sample_batch)
    model.target_soft_value = clock.wrap("target soft value", model.target_soft_value)
    model.q_objective = clock.wrap("Q update", q_objective)
    model.reward_objective = clock.wrap("reward update", reward_objective)
    model.log_dict = clock.wrap("logging", model.log_dict)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, precision=precision,
                             logger=TensorBoardLogger(logdir), log_every_n_steps=50, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, callbacks=[TargetNetworkUpdate(), _Iterations(clock)])
        # The backward passes and optimizer steps run in _update: charge them to the
        # objective of the optimizer being stepped.
        q_opt_holder: dict = {}

        def which(args):
            if "q" not in q_opt_holder:
                q_opt_holder["q"] = model.optimizers()[0].optimizer
            opt = getattr(args[0], "optimizer", args[0])
            return "Q update" if opt is q_opt_holder["q"] else "reward update"

        model._update = clock.wrap(which, model._update)
        trainer.fit(model, dm)
        elapsed = time.perf_counter() - clock.started
    per_iter = elapsed / updates
    shares = {part: clock.total[part] / elapsed for part in PARTS}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return {"batch": batch, "width": width, "ms_per_iter": 1e3 * per_iter, "iters_per_s": 1 / per_iter,
            "shares": shares}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--task", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    dataset_id = f"bench/{args.task}/expert-n10-v0"
    grid = [(b, 256) for b in args.batches] + [(256, w) for w in args.widths if w != 256]
    rows = []
    for batch, width in grid:
        pl.seed_everything(0, verbose=False)
        rows.append(profile(dataset_id, batch, width, args.updates, args.warmup))
        print(json.dumps(rows[-1]), flush=True)
    header = "| batch | width | ms / iteration | iterations / s | " + " | ".join(PARTS + ("other",)) + " |"
    lines = [header, "|" + "---|" * (4 + len(PARTS) + 1)]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['width']} | {r['ms_per_iter']:.1f} | {r['iters_per_s']:.1f} | "
                     + " | ".join(f"{100 * r['shares'][p]:.0f}%" for p in PARTS + ("other",)) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        settings, precision = benchmark_settings()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "dataset": dataset_id, "precision": precision, "threads": torch.get_num_threads(),
            "updates": args.updates, "rows": rows, "table": table,
            "median_ms": statistics.median(r["ms_per_iter"] for r in rows)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
