"""Make every dataset of the MuJoCo imitation protocol (shared/BENCHMARK.md).

    python -m bench.datasets --manifest ../shared/experts/experts.json --out DIR

For each task of the manifest (and only those: no task name is written here) it writes,
with the project's own dataset tools, the local Minari datasets

    bench/<task>/expert-n1-v0, expert-n10-v0   N expert episodes, noise 0.5, reset seeds 0..N-1
    bench/<task>/mixed-v0                      100 episodes, seeds 1000..1099, episode i takes a
                                               uniform random action w.p. i/99, else the expert's
                                               action with noise 1.0
    bench/<task>/heldout-expert-v0             10 expert episodes, noise 0.5, seeds 500..509
    bench/<task>/medium-v0                     100 episodes of the manifest's medium policy
                                               (where it names one), noise 0.5, seeds 2000..2099

each carrying R_random and R_expert (deterministic expert and uniform random actions on the
evaluation seeds 10000..10009) as Minari's ref_min_score/ref_max_score. A dataset already
present with the right number of episodes and reference scores is kept.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np

from bicql_lightning.datasets import REF_EVAL_SEEDS, collect_dataset, evaluate_policy
from bicql_lightning.experts import MLPExpert, epsilon_random, random_policy

EXPERT_NOISE = 0.5
MIXED_NOISE = 1.0
MIXED_EPISODES = 100
HELDOUT_SEEDS = list(range(500, 510))
MEDIUM_SEEDS = list(range(2000, 2100))


@dataclass(frozen=True)
class Task:
    """One manifest entry."""

    name: str
    env_id: str
    env_kwargs: dict
    expert_file: Path
    medium_file: Path | None = None  # the manifest's optional medium-quality policy

    def make_env(self) -> gym.Env:
        return gym.make(self.env_id, **self.env_kwargs)

    def expert(self, noise: float, space: gym.spaces.Box | None = None) -> MLPExpert:
        space = space if space is not None else self.make_env().action_space
        return MLPExpert.from_npz(self.expert_file, noise=noise, action_low=space.low, action_high=space.high)

    def medium(self, noise: float, space: gym.spaces.Box | None = None) -> MLPExpert:
        if self.medium_file is None:
            raise ValueError(f"task {self.name!r} names no medium policy in its manifest")
        space = space if space is not None else self.make_env().action_space
        return MLPExpert.from_npz(self.medium_file, noise=noise, action_low=space.low, action_high=space.high)

    def dataset_id(self, kind: str) -> str:
        return f"bench/{self.name}/{kind}-v0"


def read_manifest(path: str | os.PathLike) -> list[Task]:
    """Tasks of an experts manifest (``{name: {file, env_id, env_kwargs[, medium]}}``), in file order."""
    path = Path(path)
    entries = json.loads(path.read_text())
    return [Task(name=name, env_id=entry["env_id"], env_kwargs=dict(entry.get("env_kwargs") or {}),
                 expert_file=path.parent / entry["file"],
                 medium_file=path.parent / entry["medium"] if entry.get("medium") else None)
            for name, entry in entries.items()]


def _valid(dataset_id: str, episodes: int) -> bool:
    try:
        meta = minari.load_dataset(dataset_id).storage.metadata
    except Exception:  # noqa: BLE001 - absent or unreadable: (re)make it
        return False
    return meta.get("total_episodes") == episodes and meta.get("ref_max_score") is not None


def reference_returns(task: Task) -> tuple[float, float]:
    """(R_random, R_expert) on the protocol's evaluation seeds."""
    env = task.make_env()
    try:
        expert = float(evaluate_policy(env, task.expert(0.0), REF_EVAL_SEEDS).mean())
        rand = float(evaluate_policy(env, random_policy(env.action_space), REF_EVAL_SEEDS).mean())
    finally:
        env.close()
    return rand, expert


def make_task_datasets(task: Task, progress: bool = True) -> dict[str, str]:
    """Make (or keep) the four datasets of one task; returns kind -> dataset id."""
    # One environment for the action space: every gym.make of a MuJoCo task recompiles its model.
    action_space = task.make_env().action_space
    plan = {
        "expert-n1": dict(num_episodes=1, seed=0, policy=task.expert(EXPERT_NOISE, action_space)),
        "expert-n10": dict(num_episodes=10, seed=0, policy=task.expert(EXPERT_NOISE, action_space)),
        "mixed": dict(num_episodes=MIXED_EPISODES, episode_seeds=list(range(1000, 1000 + MIXED_EPISODES)),
                      policy=[epsilon_random(task.expert(MIXED_NOISE, action_space), i / (MIXED_EPISODES - 1),
                                             action_space) for i in range(MIXED_EPISODES)]),
        "heldout-expert": dict(num_episodes=len(HELDOUT_SEEDS), episode_seeds=HELDOUT_SEEDS,
                               policy=task.expert(EXPERT_NOISE, action_space)),
    }
    if task.medium_file is not None:
        plan["medium"] = dict(num_episodes=len(MEDIUM_SEEDS), episode_seeds=MEDIUM_SEEDS,
                              policy=task.medium(EXPERT_NOISE, action_space))
    ids = {kind: task.dataset_id(kind) for kind in plan}
    todo = [kind for kind, spec in plan.items() if not _valid(ids[kind], spec["num_episodes"])]
    if todo:
        rand, expert = reference_returns(task)
        print(f"{task.name}: R_random={rand:.1f} R_expert={expert:.1f}", flush=True)
        for kind in todo:
            spec = dict(plan[kind])
            collect_dataset(ids[kind], task.env_id, spec.pop("policy"), spec.pop("num_episodes"),
                            env_kwargs=task.env_kwargs or None, ref_min_score=rand, ref_max_score=expert,
                            description=f"{kind} data of the {task.name} expert (shared/BENCHMARK.md)",
                            overwrite=True, progress=progress, **spec)
    for kind, dataset_id in ids.items():
        ds = minari.load_dataset(dataset_id)
        returns = [float(np.sum(ep.rewards)) for ep in ds.iterate_episodes()]
        print(f"{dataset_id}: {ds.total_episodes} episodes, {ds.total_steps} transitions, "
              f"mean return {np.mean(returns):.1f}{' (kept)' if kind not in todo else ''}", flush=True)
    return ids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="experts manifest, e.g. ../shared/experts/experts.json")
    parser.add_argument("--out", required=True, help="Minari root to write into (MINARI_DATASETS_PATH)")
    parser.add_argument("--tasks", nargs="*", default=None, help="subset of the manifest's tasks")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.out).resolve())
    tasks = read_manifest(args.manifest)
    unknown = set(args.tasks or []) - {t.name for t in tasks}
    if unknown:
        parser.error(f"tasks {sorted(unknown)} are not in {args.manifest}: {[t.name for t in tasks]}")
    for task in tasks:
        if args.tasks is None or task.name in args.tasks:
            make_task_datasets(task, progress=not args.no_progress)


if __name__ == "__main__":
    main()
