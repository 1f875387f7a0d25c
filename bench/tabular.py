"""Tabular sanity benchmark: BiCQL-ML against exact answers on small MDPs.

On the deterministic 8x8 gridworld and Garnet MDPs (seeds 0.., S 20..50, A 4..5,
branching 3) of :mod:`bicql_lightning.tabular`, with gamma (0.9) and temperature (1.0)
shared by the expert and the learner, this script

1. solves each MDP exactly (soft value iteration) and writes 100 (the largest N)
   episodes of the Boltzmann expert pi* as a Minari dataset with ``collect_dataset``
   (in a temporary Minari root unless ``--minari-root``), and ``--offline-episodes``
   (default 100; 0 for the expert-only setting) uniform-random episodes as offline data;
2. trains ``BiCQLML`` through ``OfflineIRLDataModule`` (one-hot states) on the first N
   expert episodes plus the offline data, for each N of ``--episodes``;
3. scores the learned reward table and the Boltzmann(Q) policy exactly
   (:class:`bicql_lightning.tabular_metrics.TabularTask`), next to behaviour cloning by
   counts (prior 0.5; its implied reward T log pi_bc for reward_dist) and the trivial
   rewards (zero, i.i.d. normal) for reward_dist and EPIC.

Prints one line per case and N and a summary line per N (means over cases). The
defaults are the settings tuned in ``bench/results/tabular_tuning.txt``::

    python -m bench.tabular --out bench/results/tabular.txt   # ~7-10 min on 2 busy cores
    python -m bench.tabular --quick                            # CI-sized: gridworld + 2 Garnets, N=10
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.machine import cpu_model

import gymnasium as gym
import numpy as np


def cases(num_garnets: int, garnet_states: tuple[int, int], quick: bool) -> list[tuple[str, str, dict]]:
    from bicql_lightning.tabular import GARNET_ID, GRIDWORLD_ID

    out = [("gridworld", GRIDWORLD_ID, {"slip": 0.0})]
    lo, hi = garnet_states
    for k in range(num_garnets):
        S = lo + ((hi - lo) * k) // max(num_garnets - 1, 1)
        out.append((f"garnet{k}", GARNET_ID, {"seed": k, "S": S, "A": 4 + k % 2, "b": 3}))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, nargs="+", default=[1, 10, 100], help="expert episodes N")
    p.add_argument("--quick", action="store_true", help="CI-sized run: gridworld + 2 small Garnets, N=10")
    p.add_argument("--garnets", type=int, default=10, help="number of Garnet seeds (0..)")
    p.add_argument("--garnet-states", type=int, nargs=2, default=[20, 50], metavar=("MIN", "MAX"))
    p.add_argument("--only", nargs="*", default=None, help="run only these case names (gridworld, garnet3, ...)")
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--updates", type=int, default=3000, help="training updates per run")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64, help="width of the two hidden layers (Q and reward)")
    p.add_argument("--alpha", type=float, default=3.0)
    p.add_argument("--cql-data", default="expert", choices=["offline", "expert", "both"])
    p.add_argument("--reward-bound", type=float, default=5.0)
    p.add_argument("--reward-on-offline", type=int, default=1, choices=[0, 1])
    p.add_argument("--q-lr", type=float, default=3e-4)
    p.add_argument("--reward-lr", type=float, default=3e-4)
    p.add_argument("--q-updates", type=int, default=1)
    p.add_argument("--reward-updates", type=int, default=1)
    p.add_argument("--tau", type=float, default=0.02)
    p.add_argument("--offline-episodes", type=int, default=100,
                   help="uniform-random offline episodes added to D (0: D = D_E, the expert-only setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minari-root", default=None, help="Minari root for the datasets (default: a temporary one)")
    p.add_argument("--out", default=None, help="also write the printed lines to this file")
    return p


def run_case(name: str, env_id: str, kwargs: dict, args: argparse.Namespace, emit) -> dict[int, dict]:
    import lightning.pytorch as pl
    import torch

    from bicql_lightning import BiCQLML, OfflineIRLDataModule, TargetNetworkUpdate, collect_dataset
    from bicql_lightning.experts import random_policy
    from bicql_lightning.tabular import tabular_policy
    from bicql_lightning.tabular_metrics import TabularTask, count_bc_policy

    env = gym.make(env_id, **kwargs)
    task = TabularTask.from_env(env, args.gamma, args.temperature)
    S, A = task.R.shape
    expert_id, offline_id = f"tabular/{name}/expert-v0", f"tabular/{name}/random-v0"
    collect_dataset(expert_id, env, tabular_policy(task.pi_star), max(args.episodes), seed=args.seed,
                    progress=False, overwrite=True, description=f"Boltzmann expert of {env_id} {kwargs}")
    if args.offline_episodes:
        collect_dataset(offline_id, env, random_policy(env.action_space), args.offline_episodes,
                        seed=args.seed + 100_000, progress=False, overwrite=True)
    trivial_rng = np.random.default_rng(1234)
    zero = task.reward_metrics(np.zeros((S, A)))
    rand = task.reward_metrics(trivial_rng.standard_normal((S, A)))
    # EPIC's (s, a) lift does not remove (s, a)-shaping: T log pi*, which is the true reward
    # up to such shaping, shows the floor a perfect recovery would score.
    epic_floor = task.reward_metrics(args.temperature * np.log(task.pi_star)).get("epic", float("nan"))
    results = {}
    for N in args.episodes:
        pl.seed_everything(args.seed, verbose=False)
        dm = OfflineIRLDataModule(expert_dataset=expert_id,
                                  offline_dataset=offline_id if args.offline_episodes else None,
                                  expert_episodes=N, batch_size=args.batch_size, batches_per_epoch=args.updates,
                                  val_size=64, seed=args.seed, download=False)
        model = BiCQLML(spaces=dm.spaces, hidden_sizes=[args.hidden] * 2, reward_hidden_sizes=[args.hidden] * 2,
                        gamma=args.gamma, temperature=args.temperature, alpha=args.alpha, cql_data=args.cql_data,
                        q_updates=args.q_updates, reward_updates=args.reward_updates, q_lr=args.q_lr,
                        reward_lr=args.reward_lr, reward_bound=args.reward_bound,
                        reward_on_offline=bool(args.reward_on_offline), log_every_n_updates=10**9)
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                             accelerator="cpu", callbacks=[TargetNetworkUpdate(tau=args.tau)])
        start = time.perf_counter()
        trainer.fit(model, dm)
        wall = time.perf_counter() - start
        m = task.evaluate_model(model)
        bc_pi = count_bc_policy(dm.expert.observations, dm.expert.actions, S, A, prior=0.5)
        bc = {**task.policy_metrics(bc_pi), **task.reward_metrics(args.temperature * np.log(bc_pi))}
        r = dict(m, wall_s=wall, epic_floor=epic_floor,
                 **{f"bc_{k}": v for k, v in bc.items()},
                 **{f"zero_{k}": v for k, v in zero.items()}, **{f"random_{k}": v for k, v in rand.items()})
        results[N] = r
        epic = (f" epic={r['epic']:.2f} (T log pi* {epic_floor:.2f}, bc {r['bc_epic']:.2f}, "
                f"random {r['random_epic']:.2f})" if "epic" in r else "")
        emit(f"case {name:9s} S={S:2d} A={A} N={N:3d}: return_ratio={r['return_ratio']:.3f} "
             f"nll_gap={r['nll_gap']:.3f} reward_dist={r['reward_dist']:.3f} (all actions "
             f"{r['reward_dist_all']:.3f}){epic} | pi_Q return_ratio={r['policy_return_ratio']:.3f} | "
             f"bc: return_ratio={r['bc_policy_return_ratio']:.3f} nll_gap={r['bc_nll_gap']:.3f} "
             f"reward_dist={r['bc_reward_dist']:.3f} ({r['bc_reward_dist_all']:.3f}) | reward_dist "
             f"zero={r['zero_reward_dist']:.3f} ({r['zero_reward_dist_all']:.3f}) random="
             f"{r['random_reward_dist']:.3f} ({r['random_reward_dist_all']:.3f}) | {len(dm.expert)} "
             f"transitions, {wall:.1f}s")
        torch.set_num_threads(1)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.episodes, args.garnets, args.garnet_states = [10], 2, [20, 25]
        args.updates = min(args.updates, 1000)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import logging

    import lightning.pytorch  # noqa: F401 - imported first: it resets its loggers' levels on import
    import torch

    torch.set_num_threads(1)  # tiny networks: one thread is fastest on a shared CPU
    for logger_name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(logger_name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    command = "python -m bench.tabular " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    emit(f"# {command}")
    emit(f"# machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread")
    emit(f"# gamma={args.gamma} temperature={args.temperature} updates={args.updates} batch={args.batch_size} "
         f"hidden={args.hidden} alpha={args.alpha} cql_data={args.cql_data} reward_bound={args.reward_bound} "
         f"reward_on_offline={args.reward_on_offline} q_lr={args.q_lr} reward_lr={args.reward_lr} "
         f"K_Q={args.q_updates} K_R={args.reward_updates} tau={args.tau} offline_episodes={args.offline_episodes}")
    todo = [c for c in cases(args.garnets, tuple(args.garnet_states), args.quick)
            if args.only is None or c[0] in args.only]
    all_results: dict[int, list[dict]] = {N: [] for N in args.episodes}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MINARI_DATASETS_PATH"] = args.minari_root or tmp
        for name, env_id, kwargs in todo:
            for N, r in run_case(name, env_id, kwargs, args, emit).items():
                all_results[N].append(dict(r, name=name))
    for N in args.episodes:
        rs = all_results[N]
        mean = lambda k: float(np.nanmean([r[k] for r in rs]))  # noqa: E731
        grid = [r for r in rs if "epic" in r]
        epic = (f" | gridworld epic={grid[0]['epic']:.2f} (T log pi* {grid[0]['epic_floor']:.2f}, "
                f"bc {grid[0]['bc_epic']:.2f}, random {grid[0]['random_epic']:.2f})" if grid else "")
        emit(f"tabular N={N}: return_ratio={mean('return_ratio'):.2f} nll_gap={mean('nll_gap'):.3f} "
             f"reward_dist={mean('reward_dist'):.2f} cases={len(rs)} | reward_dist all actions="
             f"{mean('reward_dist_all'):.2f}, min return_ratio={min(r['return_ratio'] for r in rs):.2f}, "
             f"pi_Q return_ratio={mean('policy_return_ratio'):.2f} | bc: return_ratio="
             f"{mean('bc_policy_return_ratio'):.2f} nll_gap={mean('bc_nll_gap'):.3f} reward_dist="
             f"{mean('bc_reward_dist'):.2f} ({mean('bc_reward_dist_all'):.2f}) | reward_dist zero="
             f"{mean('zero_reward_dist'):.2f} ({mean('zero_reward_dist_all'):.2f}) random="
             f"{mean('random_reward_dist'):.2f} ({mean('random_reward_dist_all'):.2f}){epic}")
    emit(f"# total {time.perf_counter() - start:.0f}s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
