"""Memory and start-up time of a large dataset: 2 million transitions in the data module.

    python -m bench.memory --transitions 2000000 --out bench/results/memory.json

Writes a synthetic Minari dataset (hdf5, Hopper-shaped: 11 float32 observations, 3
actions in [-1, 1], 1000-step episodes) plus 10 episodes standing for the expert data,
then, in a fresh process, builds ``OfflineIRLDataModule`` on them (D = the 2M
transitions with the expert ones appended) and runs ``Trainer.fit`` of ``BiCQLML``
for a few updates. It reports

* ``peak_rss_ratio``: the process's peak resident memory while the data module loads
  the data and samples 200 batches, minus the same for a 10-episode D (both fresh
  processes, so imports cancel out), divided by the size of the raw arrays of the extra
  transitions (every stored observation, actions, rewards, terminations and
  truncations, in the dtypes the data module keeps: float32 and bool): 1.0 would be
  the arrays alone, with no copy; the target is at most 1.5. (The training updates that
  follow add the same activation memory for any dataset size; their peak is reported
  as ``fit_peak_rss_mb`` but varies by tens of MB from run to run with the allocator.)
* ``time_to_first_step_s``: from the data module's construction to the end of the first
  training update (reading the files, statistics, the proposal fit, Lightning's start);
* the sampling rate of ``sample_batch`` (batch 256) from the 2M transitions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

OBS_DIM, ACT_DIM, EPISODE = 11, 3, 1000


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def write_datasets(root: Path, transitions: int) -> None:
    """The synthetic D (``transitions`` steps) and expert (10 episodes) datasets under ``root``."""
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    obs_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
    rng = np.random.default_rng(0)

    def episodes(count: int, start: int):
        for k in range(count):
            yield EpisodeBuffer(
                id=start + k, observations=rng.standard_normal((EPISODE + 1, OBS_DIM), np.float32),
                actions=rng.uniform(-1, 1, (EPISODE, ACT_DIM)).astype(np.float32),
                rewards=rng.standard_normal(EPISODE).astype(np.float32), terminations=np.zeros(EPISODE, bool),
                truncations=np.r_[np.zeros(EPISODE - 1, bool), True])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, count in (("large", transitions // EPISODE), ("expert", 10)):
            # Written in parts so this process never holds the whole dataset either.
            dataset = None
            for part in range(0, count, 200):
                buffers = list(episodes(min(200, count - part), part))
                if dataset is None:
                    dataset = minari.create_dataset_from_buffers(
                        f"mem/{name}-v0", buffers, observation_space=obs_space, action_space=act_space,
                        algorithm_name="bench.memory", data_format="hdf5")
                else:
                    dataset.storage.update_episodes(buffers)


def measure(root: Path, offline: str, updates: int) -> dict:
    """Run in a fresh process: peak memory and timings of the data module on the datasets."""
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    import lightning.pytorch as pl
    import torch

    from bicql_lightning import BiCQLML, OfflineIRLDataModule

    torch.set_num_threads(1)
    start_rss, start_peak = _rss_mb(), _peak_mb()
    first_step: list[float] = []

    class FirstStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not first_step:
                first_step.append(time.perf_counter())

    t0 = time.perf_counter()
    dm = OfflineIRLDataModule(expert_dataset="mem/expert-v0", offline_dataset=offline,
                              batch_size=256, batches_per_epoch=updates)
    dm.setup("fit")
    sample_start = time.perf_counter()
    for _ in range(200):
        dm.sample_batch()
    sample_rate = 200 / (time.perf_counter() - sample_start)
    data_peak = _peak_mb()
    model = BiCQLML(spaces=dm.spaces, proposal_fit_steps=100)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[FirstStep()])
    trainer.fit(model, dm)
    store = dm.offline_store
    n, rows = len(store), store.obs.shape[0]
    raw = rows * OBS_DIM * 4 + n * (ACT_DIM * 4 + 4 + 1 + 1)
    return {"transitions": n, "stored_observations": rows, "raw_mb": raw / 2**20,
            "store_mb": store.nbytes / 2**20, "rss_before_mb": start_rss, "peak_rss_mb": data_peak,
            "fit_peak_rss_mb": _peak_mb(),
            "peak_before_mb": start_peak,
            "time_to_first_step_s": first_step[0] - t0, "sample_batches_per_s": sample_rate,
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transitions", type=int, default=2_000_000)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--root", default=None, help="Minari root to write to (default: a temporary folder)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--_measure", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(Path(args._measure[0]), args._measure[1], args.updates)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        start = time.perf_counter()
        write_datasets(root, args.transitions)
        print(f"datasets written in {time.perf_counter() - start:.0f} s", flush=True)
        runs = {}
        for offline in ("mem/expert-v0", "mem/large-v0"):
            proc = subprocess.run([sys.executable, "-m", "bench.memory", "--_measure", str(root), offline,
                                   "--updates", str(args.updates)], capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parents[1])
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            runs[offline] = json.loads(proc.stdout.strip().splitlines()[-1])
    small, result = runs["mem/expert-v0"], dict(runs["mem/large-v0"])
    result["small_run"] = small
    result["peak_rss_growth_mb"] = result["peak_rss_mb"] - small["peak_rss_mb"]
    result["peak_rss_ratio"] = result["peak_rss_growth_mb"] / (result["raw_mb"] - small["raw_mb"])
    result["command"] = "python -m bench.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"memory: transitions={result['transitions']} raw={result['raw_mb']:.0f}MB "
          f"peak_rss_growth={result['peak_rss_growth_mb']:.0f}MB "
          f"peak_rss_ratio={result['peak_rss_ratio']:.2f} time_to_first_step={result['time_to_first_step_s']:.1f}s "
          f"sampling={result['sample_batches_per_s']:.0f} batches/s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
