"""What an IQL cell's policy does: retrain one cell as ``bench.run`` does, then roll it out.

    python -m bench.iql_episodes --manifest ../shared/experts/experts.json --data DATA \\
        --task hopper --cell with-mixed:sub20:1 --seed 2 --algo iql_transfer \\
        --configs CONFIGS --checkpoints CK

A score says how much return the policy earns; this says how: per evaluation episode
(reset seeds 10000.., deterministic actions) its length, mean forward velocity
(``info["x_velocity"]``) and the mean reward IQL trained on paid it per step, plus the
mean per-step reward IQL's rewards pay the held-out expert's and ``mixed``'s pairs. One
JSON line goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import yaml

from bench.datasets import read_manifest
from bench.run import EVAL_SEEDS, ROOT, checkpoint_path, parse_cell, train_cell
from bicql_lightning import load_transitions


def mean_paid(model, observations: np.ndarray, actions: np.ndarray, rewards: np.ndarray) -> float:
    """The mean reward IQL trains on over these pairs (its ``rewards``: the true ``rewards`` or the
    learned reward, ranked, centred or scaled as configured)."""
    batch = {"obs": torch.as_tensor(observations, dtype=torch.float32),
             "action": torch.as_tensor(actions, dtype=torch.float32),
             "reward": torch.as_tensor(rewards, dtype=torch.float32)}
    return float(model.rewards(batch).mean())


def episodes(model, env_id: str, count: int) -> list[dict]:
    rows = []
    for episode in range(count):
        env = gym.make(env_id)
        obs, _ = env.reset(seed=EVAL_SEEDS[0] + episode)
        observations, actions, rewards, velocity, done = [], [], [], [], False
        while not done:
            action = model.act(obs[None], deterministic=True)[0]
            observations.append(obs)
            actions.append(action)
            obs, reward, terminated, truncated, info = env.step(action)
            rewards.append(reward)
            velocity.append(info.get("x_velocity", float("nan")))
            done = terminated or truncated
        env.close()
        rows.append({"length": len(actions), "forward_velocity": float(np.mean(velocity)),
                     "paid_per_step": mean_paid(model, np.array(observations), np.array(actions), np.array(rewards))})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--task", required=True)
    parser.add_argument("--cell", type=parse_cell, required=True, metavar="REGIME[:DEMOS]:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algo", choices=["iql_oracle", "iql_transfer"], default="iql_transfer")
    parser.add_argument("--configs", default=str(ROOT / "configs" / "bench"), help="folder holding iql.yaml")
    parser.add_argument("--checkpoints", default=None, help="the BiCQL-ML checkpoints (iql_transfer)")
    parser.add_argument("--episodes", type=int, default=EVAL_SEEDS[1])
    args = parser.parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    torch.set_num_threads(1)
    task = next((t for t in read_manifest(args.manifest) if t.name == args.task), None)
    if task is None:
        raise SystemExit(f"bench.iql_episodes: no task {args.task!r} in {args.manifest}.")
    regime, demos, n = args.cell
    config = yaml.safe_load((Path(args.configs) / "iql.yaml").read_text())
    if args.algo == "iql_transfer":
        if args.checkpoints is None:
            raise SystemExit("bench.iql_episodes: iql_transfer needs --checkpoints, the folder of the cell's BiCQL-ML checkpoint.")
        config["model"].setdefault("init_args", {})["reward"] = str(
            checkpoint_path(Path(args.checkpoints), task, regime, demos, n, args.seed))
    model, _, evaluation, wall = train_cell(task, regime, n, args.seed, config, demos)
    model.eval()
    pairs = {name: load_transitions(task.dataset_id(name)) for name in ("heldout-expert", "mixed")}
    print(json.dumps({
        "task": task.name, "cell": f"{regime}:{demos}:{n}", "algo": args.algo, "seed": args.seed,
        "reward_rank": bool(config["model"].get("init_args", {}).get("reward_rank", False)),
        "normalized_score": evaluation.last["normalized_score"], "wall_s": round(wall, 1),
        "paid_per_step": {name: mean_paid(model, t.observations, t.actions, t.rewards) for name, t in pairs.items()},
        "episodes": episodes(model, task.env_id, args.episodes)}))


if __name__ == "__main__":
    main()
