"""What a ranked reward pays per step, on logged pairs and on simple policies' rollouts.

    python -m bench.ranked_pay CKPT --manifest ../shared/experts/experts.json --data DATA \\
        --task hopper --score log_likelihood --results bench/results/v2/ranked_pay.jsonl

Before SAC trains on a ``RankedReward`` for tens of minutes, this says what the reward
asks for. The checkpoint's score (``reward``, ``soft_advantage`` or ``log_likelihood``) is
ranked among the pairs of the cell's D (``--rank-among``, ``mixed`` by default), and the
mean rank per step is reported on:

* the pairs of D_E (``expert-n1``), ``mixed`` and, where the manifest names a medium
  policy, ``medium``;
* the expert's states with a zero and with a uniformly random action (does it score the
  action given the state, or the state alone?);
* rollouts in the task's environment of a zero, a uniformly random and the checkpoint's
  own greedy controller (``--episodes`` each, reset seeds 0, 1, ...): what holding still,
  flailing and acting as the controller acts would be paid.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from bench.datasets import read_manifest
from bicql_lightning import BiCQLML, RankedReward, load_transitions


def rollout_pairs(env, act, episodes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Observations and actions of ``episodes`` rollouts of ``act(obs)`` and their mean true return."""
    observations, actions, returns = [], [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=episode)
        total, done = 0.0, False
        while not done:
            action = act(obs, rng)
            observations.append(obs)
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return np.asarray(observations), np.asarray(actions), float(np.mean(returns))


def pay(ckpt: str, task, score: str, rank_among: str, episodes: int, seed: int = 0) -> dict[str, dict]:
    """Mean ranked pay per step (and its median) on each set of pairs named in the module docstring."""
    ranked = RankedReward.from_checkpoint(ckpt, task.dataset_id(rank_among), score=score)
    rng = np.random.default_rng(seed)
    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for kind in ("expert-n1", "mixed", "medium") if task.medium_file is not None else ("expert-n1", "mixed"):
        data = load_transitions(task.dataset_id(kind))
        sets[kind] = (data.observations, data.actions)
    expert_obs, expert_actions = sets["expert-n1"]
    env = task.make_env()
    low, high = env.action_space.low, env.action_space.high
    sets["expert states, zero action"] = (expert_obs, np.zeros_like(expert_actions))
    sets["expert states, random action"] = (expert_obs, rng.uniform(low, high, expert_actions.shape))
    controller = BiCQLML.load_from_checkpoint(ckpt, map_location="cpu").eval().policy
    policies = {"zero": lambda obs, rng: np.zeros_like(low),
                "random": lambda obs, rng: rng.uniform(low, high).astype(low.dtype),
                "controller": lambda obs, rng: controller.act(obs, deterministic=True)}
    true_returns = {}
    for name, act in policies.items():
        obs, actions, true_returns[name] = rollout_pairs(env, act, episodes, rng)
        sets[f"{name} rollouts"] = (obs, actions)
    out = {}
    for name, (obs, actions) in sets.items():
        ranks = ranked.predict(obs, actions)
        out[name] = {"mean": float(ranks.mean()), "median": float(np.median(ranks)), "pairs": int(len(ranks))}
        if name.endswith(" rollouts"):
            out[name]["true_return"] = true_returns[name.removesuffix(" rollouts")]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--manifest", required=True)
    p.add_argument("--data", required=True, help="MINARI_DATASETS_PATH that bench.datasets wrote")
    p.add_argument("--task", required=True)
    p.add_argument("--score", default="reward", choices=["reward", "soft_advantage", "log_likelihood",
                                                                "relative_log_likelihood"])
    p.add_argument("--rank-among", default="mixed", help="the dataset kind D whose pairs set the ranks")
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--results", help="append one JSON line here")
    args = p.parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    tasks = {t.name: t for t in read_manifest(args.manifest)}
    if args.task not in tasks:
        raise SystemExit(f"task {args.task!r} is not in {args.manifest}; it has {', '.join(tasks)}")
    out = pay(args.checkpoint, tasks[args.task], args.score, args.rank_among, args.episodes)
    for name, row in out.items():
        extra = f"  (true return {row['true_return']:.0f})" if "true_return" in row else ""
        print(f"{name:30s} mean {row['mean']:.3f}  median {row['median']:.3f}  pairs {row['pairs']}{extra}")
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps({"checkpoint": args.checkpoint, "task": args.task, "score": args.score,
                                "rank_among": args.rank_among, "pay": out}) + "\n")


if __name__ == "__main__":
    main()
