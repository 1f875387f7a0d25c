"""Training throughput of BiCQL-ML next to d3rlpy's CQL, on the same data, in one run.

    python -m bench.datasets --manifest ../shared/experts/experts.json --out DATA --tasks hopper
    python -m bench.throughput --data DATA --task hopper

Times, on the benchmark dataset `bench/<task>/expert-n10-v0` (D = D_E) with batch 256 and
hidden sizes (256, 256):

* BiCQL-ML training iterations per second as ``Trainer.fit`` runs them (sampling, both
  updates, target sync and logging included), with the module's benchmark settings;
* d3rlpy's ``CQLConfig`` updates per second (``update`` on batches it samples itself);
* this machine's dense float32 matmul rate (2048²), and BiCQL-ML's floating-point work
  per iteration counted with ``torch.utils.flop_counter``, giving ``peak_frac``.

Each figure is the median of ``--repeats`` timed windows; the line to read is
``throughput: bicql=…/s d3rlpy_cql=…/s ratio=… peak_frac=…``. d3rlpy is an optional,
benchmark-only dependency (``pip install --no-deps d3rlpy==2.8.1`` then its own needs
without gymnasium, see the README); without it only BiCQL-ML is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.flop_counter import FlopCounterMode

from bicql_lightning import BiCQLML, OfflineIRLDataModule, TargetNetworkUpdate, load_transitions

BATCH = 256
HIDDEN = [256, 256]


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


class _Windows(pl.Callback):
    """Wall time of consecutive windows of ``length`` updates after ``warmup`` updates."""

    def __init__(self, warmup: int, length: int):
        self.warmup, self.length = warmup, length
        self.marks: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.updates >= self.warmup and (pl_module.updates - self.warmup) % self.length == 0:
            self.marks.append(time.perf_counter())

    def rates(self) -> list[float]:
        return [self.length / (b - a) for a, b in zip(self.marks, self.marks[1:])]


def bicql_model_kwargs() -> dict:
    return dict(hidden_sizes=HIDDEN, reward_hidden_sizes=HIDDEN, q_updates=1, reward_updates=1)


def time_bicql(dataset_id: str, repeats: int, window: int, warmup: int) -> tuple[list[float], float]:
    dm = OfflineIRLDataModule(expert_dataset=dataset_id, offline_dataset=None, batch_size=BATCH,
                              batches_per_epoch=warmup + window * repeats + 1)
    model = BiCQLML(spaces=dm.spaces, proposal_fit_steps=200, **bicql_model_kwargs())
    timer = _Windows(warmup, window)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir),
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=[TargetNetworkUpdate(), timer])
        trainer.fit(model, dm)
    flops = count_flops(model, dm)
    return timer.rates()[:repeats], flops


def count_flops(model: BiCQLML, dm: OfflineIRLDataModule) -> float:
    """Floating-point operations of one iteration: both objectives, forward and backward."""
    batch = dm.sample_batch()
    offline, expert = batch["offline"], batch["expert"]
    with FlopCounterMode(display=False) as counter:
        loss, _ = model.q_objective(offline, expert)
        loss.backward()
        pairs = {k: torch.cat([expert[k], offline[k]]) for k in expert} if model.hparams.reward_on_offline else expert
        loss, _ = model.reward_objective(pairs)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def time_d3rlpy(transitions, repeats: int, window: int, warmup: int) -> list[float] | None:
    try:
        import d3rlpy
    except ImportError:
        return None
    dataset = d3rlpy.dataset.MDPDataset(
        observations=transitions.observations, actions=transitions.actions, rewards=transitions.rewards,
        terminals=transitions.terminations.astype(np.float32),
        timeouts=np.roll(transitions.episode_starts, -1).astype(np.float32))
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=HIDDEN)
    cql = d3rlpy.algos.CQLConfig(batch_size=BATCH, actor_encoder_factory=encoder,
                                 critic_encoder_factory=encoder).create(device="cpu:0")
    cql.build_with_dataset(dataset)
    for _ in range(warmup):
        cql.update(dataset.sample_transition_batch(BATCH))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(window):
            cql.update(dataset.sample_transition_batch(BATCH))
        rates.append(window / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--task", required=True, help="a task of the manifest, e.g. hopper")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=100, help="updates per timed window")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    dataset_id = f"bench/{args.task}/expert-n10-v0"
    pl.seed_everything(0, verbose=False)
    peak = matmul_gflops()
    bicql_rates, flops = time_bicql(dataset_id, args.repeats, args.window, args.warmup)
    d3_rates = time_d3rlpy(load_transitions(dataset_id), args.repeats, args.window, args.warmup)
    bicql = statistics.median(bicql_rates)
    peak_frac = bicql * flops / 1e9 / peak
    fields = [f"bicql={bicql:.1f}/s"]
    if d3_rates is not None:
        d3 = statistics.median(d3_rates)
        fields += [f"d3rlpy_cql={d3:.1f}/s", f"ratio={bicql / d3:.2f}"]
    fields += [f"peak_frac={peak_frac:.2f}", f"gflop_per_iter={flops / 1e9:.2f}", f"matmul_gflops={peak:.0f}",
               f"threads={torch.get_num_threads()}"]
    print("throughput: " + " ".join(fields), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "task": args.task, "bicql_rates": bicql_rates, "d3rlpy_cql_rates": d3_rates, "matmul_gflops": peak,
            "bicql_flops_per_iter": flops, "threads": torch.get_num_threads(),
            "bicql_settings": {"batch": BATCH, **bicql_model_kwargs()}, "line": "throughput: " + " ".join(fields),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
