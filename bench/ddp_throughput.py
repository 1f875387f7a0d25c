"""Training updates per second with 1 and 2 processes (DDP, gloo) on the CPU.

Runs the real command line (``bicql fit``) once per setting, on the quickstart's
built-in datasets (made locally on first use, no download), and times the updates after
a warm-up with a callback. The global batch is the same in every setting, so each
setting trains the same algorithm; what changes is how the work is split:

* ``1 proc x 1 thread``: the baseline;
* ``1 proc x 2 threads``: the same cores used by intra-op threads instead;
* ``2 procs x 1 thread (ddp)``: each process computes half the batch, then one
  flattened ``all_reduce`` of the gradients per Q and per reward update.

    python -m bench.ddp_throughput --out bench/results/ddp_throughput.json

Measure on an otherwise idle machine: the settings compete for the same cores. The
1-minute load average before and after each run is recorded with its figure; a load
above ~0.5 at the start means something else was running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]

CASES = {
    # Discrete actions, exact soft value (the quickstart): CartPole, [256, 256], B = 256.
    "cartpole": {"expert_dataset": "bicql/cartpole/expert-v0", "offline_dataset": None, "cql_data": "expert"},
    # Box actions, sampled soft value with M = 10: Pendulum, [256, 256], B = 256.
    "pendulum": {"expert_dataset": "bicql/pendulum/expert-v0", "offline_dataset": None, "cql_data": "expert"},
}
SETTINGS = [("1 proc x 1 thread", 1, 1), ("1 proc x 2 threads", 1, 2), ("2 procs x 1 thread (ddp)", 2, 1)]


class Throughput(Callback):
    """Times updates ``warmup+1 .. end`` and prints ``THROUGHPUT <updates/s>`` on rank 0."""

    def __init__(self, warmup: int = 50):
        self.warmup = warmup
        self.start: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.updates == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.start is not None:
            rate = (pl_module.updates - self.warmup) / (time.perf_counter() - self.start)
            print(f"THROUGHPUT {rate:.3f} updates={pl_module.updates} world={trainer.world_size}", flush=True)


def run(case: str, processes: int, threads: int, updates: int, warmup: int, batch_size: int) -> float:
    data = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": processes, "strategy": "ddp" if processes > 1 else "auto",
                        "max_epochs": 1, "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                        "log_every_n_steps": 50, "default_root_dir": tmp,
                        "callbacks": [{"class_path": "bench.ddp_throughput.Throughput",
                                       "init_args": {"warmup": warmup}}]},
            "model": {"hidden_sizes": [256, 256], "reward_hidden_sizes": [256, 256], "cql_data": data["cql_data"],
                      "proposal_fit_steps": 200},
            "data": {"expert_dataset": data["expert_dataset"], "offline_dataset": data["offline_dataset"],
                     "batch_size": batch_size, "batches_per_epoch": warmup + updates},
        }
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        script = Path(sys.executable).with_name("bicql")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "bicql_lightning.cli"]
        # torch.set_num_threads follows OMP_NUM_THREADS in every process.
        out = subprocess.run(cmd + ["fit", "--config", str(path)], env=env, cwd=REPO, capture_output=True, text=True,
                             timeout=1800)
        found = re.search(r"THROUGHPUT ([\d.]+)", out.stdout)
        if out.returncode != 0 or not found:
            raise RuntimeError(f"{case} {processes}x{threads} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--updates", type=int, default=400, help="timed updates per run")
    parser.add_argument("--warmup", type=int, default=50, help="untimed updates first")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    results = []
    for case in args.cases:
        for name, processes, threads in SETTINGS:
            load_before = os.getloadavg()[0]
            rate = run(case, processes, threads, args.updates, args.warmup, args.batch_size)
            load_after = os.getloadavg()[0]
            results.append({"case": case, "setting": name, "processes": processes, "threads_per_process": threads,
                            "updates_per_sec": round(rate, 2), "load_before": round(load_before, 2),
                            "load_after": round(load_after, 2)})
            print(f"{case:9s} {name:26s} {rate:8.1f} updates/s   (load {load_before:.2f} -> {load_after:.2f})",
                  flush=True)
    if args.out is not None:
        import torch

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python -m bench.ddp_throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
            "global_batch": args.batch_size, "timed_updates": args.updates, "warmup_updates": args.warmup,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__,
            "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
