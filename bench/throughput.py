"""Training throughput of BiCQL-ML next to d3rlpy's CQL, on the same data, in one run.

    python -m bench.datasets --manifest ../shared/experts/experts.json --out DATA --tasks hopper
    python -m bench.throughput --data DATA --task hopper

Times, on the benchmark dataset ``bench/<task>/expert-n10-v0`` (the expert-only regime,
D = D_E) with batch 256 and hidden sizes (256, 256):

* BiCQL-ML training iterations per second as ``Trainer.fit`` runs them (sampling, both
  updates, target sync and logging included), with the settings of
  ``configs/bench/bicql.yaml`` (M sampled actions, precision, ...; K_Q = K_R = 1);
* the same with the speed levers taken away one at a time, cumulatively (``--levers``),
  so each lever's gain is measured in the same run;
* the benchmark's settings with other values of the module's options (``--also
  cql_gradient_samples=1``), each printed with its own ratio to d3rlpy;
* d3rlpy's ``CQLConfig`` updates per second (``update`` on batches it samples itself);
* this machine's dense matmul rate (2048², float32 and bfloat16), and BiCQL-ML's
  floating-point work per iteration counted with ``torch.utils.flop_counter``, giving
  ``peak_frac`` (against the matmul rate of the precision the run computes in).

On a CPU both learners run with freed memory kept (:mod:`bicql_lightning.cpu_memory`, what
a fit on a CPU sets up), and the line says ``malloc=kept``; ``BICQL_KEEP_FREED_MEMORY=0``
times them under glibc's default allocator (``malloc=default``).

Each figure is the median of ``--repeats`` timed windows; the line to read is
``throughput: bicql=…/s d3rlpy_cql=…/s ratio=… peak_frac=…``. d3rlpy is an optional,
benchmark-only dependency (``pip install --no-deps d3rlpy==2.8.1`` then its own needs
without gymnasium, see the README); without it only BiCQL-ML is timed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.flop_counter import FlopCounterMode

from bench.run import choose_precision
from bicql_lightning import BiCQLML, OfflineIRLDataModule, TargetNetworkUpdate, load_transitions
from bicql_lightning.cpu_memory import keep_freed_memory
from bicql_lightning.seeds import SeedBatch, prepare

BATCH = 256
HIDDEN = [256, 256]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "bench" / "bicql.yaml"


def matmul_gflops(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Windows(pl.Callback):
    """Wall time of consecutive windows of ``length`` updates after ``warmup`` updates."""

    def __init__(self, warmup: int, length: int):
        self.warmup, self.length = warmup, length
        self.marks: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.updates >= self.warmup and (pl_module.updates - self.warmup) % self.length == 0:
            _sync(str(pl_module.device))
            self.marks.append(time.perf_counter())

    def rates(self) -> list[float]:
        return [self.length / (b - a) for a, b in zip(self.marks, self.marks[1:])]


def benchmark_settings() -> tuple[dict, str]:
    """The model's init_args and the trainer's precision from configs/bench/bicql.yaml."""
    config = yaml.safe_load(CONFIG.read_text())
    model = dict(config["model"].get("init_args") or {})
    model.update(hidden_sizes=HIDDEN, reward_hidden_sizes=HIDDEN, q_updates=1, reward_updates=1)
    return model, str(config.get("trainer", {}).get("precision", "32-true"))


def lever_settings(model: dict, precision: str) -> list[tuple[str, dict, str, bool]]:
    """(name, model kwargs, precision, shared batch): the benchmark's settings, then each
    speed lever taken away in turn (cumulatively)."""
    rows = [("benchmark settings", dict(model), precision, True)]
    if precision != "32-true":
        rows.append(("float32 instead of " + precision, dict(model), "32-true", True))
    last_model, last_precision = rows[-1][1], rows[-1][2]
    if model.get("advantage_net") == "target":
        last_model = {**last_model, "advantage_net": "online"}
        rows.append(("+ reward's soft values recomputed (advantage_net=online)", last_model, last_precision, True))
    rows.append(("+ separate offline and expert batches from D = D_E", last_model, last_precision, False))
    return rows


def parse_option(text: str, parser: argparse.ArgumentParser) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or key not in inspect.signature(BiCQLML.__init__).parameters:
        parser.error(f"--also {text!r}: expected OPTION=VALUE with OPTION a BiCQLML argument, "
                     "e.g. cql_gradient_samples=1")
    return key, yaml.safe_load(value)


def time_bicql(dataset_id: str, model_kwargs: dict, precision: str, shared: bool, accelerator: str,
               repeats: int, window: int, warmup: int) -> tuple[list[float], float]:
    data = dict(expert_dataset=dataset_id, batch_size=BATCH, batches_per_epoch=warmup + window * repeats + 1)
    if shared:
        data.update(offline_dataset=None)
    else:  # the same transitions as D, but a second store: two batches are drawn and scored
        data.update(offline_dataset=dataset_id, include_expert_in_offline=False)
    dm = OfflineIRLDataModule(**data)
    model = BiCQLML(spaces=dm.spaces, **{**model_kwargs, "proposal_fit_steps": 200})
    timer = _Windows(warmup, window)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(max_epochs=1, accelerator=accelerator, devices=1, precision=precision,
                             logger=TensorBoardLogger(logdir), enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, callbacks=[TargetNetworkUpdate(), timer])
        trainer.fit(model, dm)
        flops = count_flops(model, dm, trainer)
    return timer.rates()[:repeats], flops


def count_flops(model: BiCQLML, dm: OfflineIRLDataModule, trainer: pl.Trainer) -> float:
    """Floating-point operations of one iteration as ``training_step`` runs it: both
    objectives, forward and backward."""
    batch = dm.transfer_batch_to_device(dm.sample_batch(), model.device, 0)
    offline, expert = batch["offline"], batch["expert"]
    with FlopCounterMode(display=False) as counter, trainer.precision_plugin.forward_context():
        next_value = model.target_soft_value(offline)
        loss, _ = model.q_objective(offline, expert, next_value)
        loss.backward()
        loss, _ = model.reward_objective(*model.reward_pairs(offline, expert), next_value)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def time_seeds(dataset_id: str, model_kwargs: dict, num_seeds: int, device: str, repeats: int, window: int,
               warmup: int) -> list[float]:
    """Aggregate iterations/s (all seeds' updates counted) of ``num_seeds`` replicas trained
    as one batched computation (:class:`~bicql_lightning.seeds.SeedBatch`, float32), in a bare
    loop of its ``step``: sampling, both levels' updates and the Polyak step of every seed."""
    models, dms = [], []
    for seed in range(num_seeds):
        pl.seed_everything(seed, verbose=False)
        dm = OfflineIRLDataModule(expert_dataset=dataset_id, offline_dataset=None, batch_size=BATCH,
                                  batches_per_epoch=1, seed=seed)
        # The fits before training are not timed: short ones keep the setup quick.
        kwargs = {**model_kwargs, "proposal_fit_steps": 200, "policy": {"init_args": {"fit_steps": 20}}}
        models.append(BiCQLML(spaces=dm.spaces, **kwargs).to(device))
        dms.append(dm)
    for model, dm, seed in zip(models, dms, range(num_seeds)):
        prepare(model, dm, seed)
    batch = SeedBatch(models, dms)
    for _ in range(warmup):
        batch.step()
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(window):
            batch.step()
        _sync(device)
        rates.append(num_seeds * window / (time.perf_counter() - start))
    return rates


def time_d3rlpy(transitions, device: str, repeats: int, window: int, warmup: int) -> list[float] | None:
    try:
        import d3rlpy
    except ImportError:
        return None
    dataset = d3rlpy.dataset.MDPDataset(
        observations=transitions.observations, actions=transitions.actions, rewards=transitions.rewards,
        terminals=transitions.terminations.astype(np.float32),
        timeouts=np.roll(transitions.episode_starts, -1).astype(np.float32))
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=HIDDEN)
    # On a GPU d3rlpy's own captured path (torch.compile + CUDA graphs), the fair
    # comparison for capture_graph; on a CPU it has none.
    cql = d3rlpy.algos.CQLConfig(batch_size=BATCH, actor_encoder_factory=encoder, critic_encoder_factory=encoder,
                                 compile_graph=str(device).startswith("cuda")).create(device=device)
    cql.build_with_dataset(dataset)
    for _ in range(warmup):
        cql.update(dataset.sample_transition_batch(BATCH))
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(window):
            cql.update(dataset.sample_transition_batch(BATCH))
        _sync(device)
        rates.append(window / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--task", required=True, help="a task of the manifest, e.g. hopper")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=100, help="updates per timed window")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="auto",
                        help="BiCQL-ML's trainer precision (e.g. 32-true, bf16-mixed); 'auto' (default) keeps "
                             "configs/bench/bicql.yaml's, except bf16 on a CPU without bf16 arithmetic, which "
                             "runs 32-true as bench.run trains it there. d3rlpy always runs in float32.")
    parser.add_argument("--levers", action="store_true", help="also time the settings without each speed lever")
    parser.add_argument("--also", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="also time the benchmark's settings with these BiCQLML options changed (one row each, "
                             "values parsed as YAML), e.g. cql_gradient_samples=1")
    parser.add_argument("--seeds", type=int, nargs="*", default=[], metavar="K",
                        help="also time K seeds trained as one batched computation (bicql_lightning.seeds), "
                             "each K against K = 1 of the same loop, e.g. --seeds 1 8")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)
    also = [parse_option(text, parser) for text in args.also]
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    dataset_id = f"bench/{args.task}/expert-n10-v0"
    device = "cuda:0" if args.accelerator == "gpu" else "cpu:0"
    # Before anything is timed, so d3rlpy runs under the allocator BiCQL-ML's fit sets up.
    kept = keep_freed_memory() if args.accelerator == "cpu" else False
    model_kwargs, precision = benchmark_settings()
    precision = choose_precision({"accelerator": "cpu" if args.accelerator == "cpu" else "gpu",
                                  "precision": precision}, args.precision)
    peaks = {"32-true": matmul_gflops(device.split(":")[0], torch.float32),
             "bf16-mixed": matmul_gflops(device.split(":")[0], torch.bfloat16)}
    rows = lever_settings(model_kwargs, precision) if args.levers else lever_settings(model_kwargs, precision)[:1]
    rows += [(f"benchmark settings, {key}={value}", {**model_kwargs, key: value}, precision, True)
             for key, value in also]
    results = []
    for name, kwargs, prec, shared in rows:
        pl.seed_everything(0, verbose=False)
        rates, flops = time_bicql(dataset_id, kwargs, prec, shared, args.accelerator, args.repeats, args.window,
                                  args.warmup)
        rate = statistics.median(rates)
        results.append({"setting": name, "precision": prec, "shared_batch": shared, "model": kwargs,
                        "rates": rates, "median": rate, "gflop_per_iter": flops / 1e9,
                        "peak_frac": rate * flops / 1e9 / peaks.get(prec, peaks["32-true"])})
        print(f"bicql [{name}]: {rate:.1f}/s gflop_per_iter={flops / 1e9:.2f} "
              f"peak_frac={results[-1]['peak_frac']:.2f}", flush=True)
    d3_rates = time_d3rlpy(load_transitions(dataset_id), device, args.repeats, args.window, args.warmup)
    bicql = results[0]["median"]
    fields = [f"bicql={bicql:.1f}/s"]
    if d3_rates is not None:
        d3 = statistics.median(d3_rates)
        fields += [f"d3rlpy_cql={d3:.1f}/s", f"ratio={bicql / d3:.2f}"]
    fields += [f"peak_frac={results[0]['peak_frac']:.2f}", f"gflop_per_iter={results[0]['gflop_per_iter']:.2f}",
               f"precision={results[0]['precision']}", f"matmul_gflops_fp32={peaks['32-true']:.0f}",
               f"matmul_gflops_bf16={peaks['bf16-mixed']:.0f}", f"device={args.accelerator}",
               f"threads={torch.get_num_threads()}", f"malloc={'kept' if kept else 'default'}"]
    line = "throughput: " + " ".join(fields)
    print(line, flush=True)
    also_lines = []
    for row in results[len(results) - len(also):] if also else []:
        name = row["setting"].removeprefix("benchmark settings, ")
        ratio = f" ratio={row['median'] / d3:.2f}" if d3_rates is not None else ""
        also_lines.append(f"throughput[{name}]: bicql={row['median']:.1f}/s{ratio} peak_frac={row['peak_frac']:.2f} "
                          f"gflop_per_iter={row['gflop_per_iter']:.2f}")
        print(also_lines[-1], flush=True)
    seed_rows = []
    for k in sorted(set(args.seeds) | ({1} if args.seeds else set())):
        rates = time_seeds(dataset_id, model_kwargs, k, device, args.repeats, args.window, args.warmup)
        seed_rows.append({"num_seeds": k, "rates": rates, "aggregate": statistics.median(rates)})
    for row in seed_rows:
        single = seed_rows[0]["aggregate"]
        also_lines.append(f"throughput[seeds={row['num_seeds']}]: aggregate={row['aggregate']:.1f}/s "
                          f"per_seed={row['aggregate'] / row['num_seeds']:.1f}/s vs_seeds1={row['aggregate'] / single:.2f} "
                          f"vs_one_process={row['aggregate'] / bicql:.2f} precision=32-true device={args.accelerator}")
        print(also_lines[-1], flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "task": args.task, "dataset": dataset_id, "batch": BATCH, "device": args.accelerator,
            "device_name": torch.cuda.get_device_name(0) if args.accelerator == "gpu" else "cpu",
            "threads": torch.get_num_threads(), "malloc_keeps_freed_memory": kept, "matmul_gflops": peaks,
            "bicql": results,
            "d3rlpy_cql_rates": d3_rates, "seeds": seed_rows, "line": line, "also_lines": also_lines,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
