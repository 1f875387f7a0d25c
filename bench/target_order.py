"""Is a learned reward's per-step order the loop's, or the reward network's fit?

    python -m bench.target_order CKPT --data DATA --dataset bench/hopper/medium-v0 \\
        --results bench/results/v2/target_order.jsonl

The reward of a BiCQL-ML checkpoint is regressed onto the soft advantage of its Q,
A = Q(s, a) − γ·V(s'). For every episode of the dataset this takes the per-step mean of the
reward r_θ, of that target A (computed as training computes it, by
``BiCQLML.advantage_parts``: Q(s, a) and V(s') from the networks ``advantage_net`` names,
V(s') from proposal samples) and of the true reward, and gives the Spearman correlation of
each learned per-step mean with the true one. Where r_θ and A rank the episodes alike, the
reward fits what the loop asks and a wrong order comes from Q; where they differ, it comes
from the reward's fit. Terminal pairs are reported apart: there A is Q(s, a) alone, and a
bounded reward may not reach it.

A is the soft advantage as the default (``reward_level: free``) regresses onto it.
``reward_level: anchored`` or ``data`` shifts each batch's target by one constant, which
leaves the per-step order alone but not ``target_mean``; ``terminal_reward: zero``
replaces the terminal pairs' target by 0, which this does not apply.
One JSON line goes to stdout (and to ``--results``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from bench.run import spearman
from bicql_lightning import BiCQLML, load_transitions

CHUNK = 8192


@torch.no_grad()
def reward_and_target(model: BiCQLML, transitions, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per transition: r_θ(s, a) and the soft advantage it is regressed onto, ``(N,)`` each."""
    n = len(transitions.rewards)
    reward, target = np.empty(n), np.empty(n)
    for i in range(0, n, CHUNK):
        part = slice(i, i + CHUNK)
        batch = {"obs": torch.as_tensor(transitions.observations[part]),
                 "action": torch.as_tensor(transitions.actions[part]),
                 "next_obs": torch.as_tensor(transitions.next_observations[part]),
                 "terminated": torch.as_tensor(transitions.terminations[part]).float()}
        q, next_value = model.advantage_parts(batch, generator=generator)
        target[part] = model.reward_target(q, next_value, batch).double().numpy()
        reward[part] = model.reward_net(batch["obs"], batch["action"]).double().numpy()
    return reward, target


def orders(reward: np.ndarray, target: np.ndarray, true: np.ndarray, episodes: np.ndarray,
           terminated: np.ndarray) -> dict[str, float]:
    """Per-step means per episode, ranked against the true ones; and the terminal pairs apart."""
    length = np.bincount(episodes).astype(np.float64)
    true_step = np.bincount(episodes, weights=true) / length
    out = {"reward_per_step_spearman": spearman(np.bincount(episodes, weights=reward) / length, true_step),
           "target_per_step_spearman": spearman(np.bincount(episodes, weights=target) / length, true_step),
           "reward_mean": float(reward.mean()), "target_mean": float(target.mean()),
           "terminal_pairs": int(terminated.sum())}
    if terminated.any():
        out.update(reward_mean_terminal=float(reward[terminated].mean()),
                   target_mean_terminal=float(target[terminated].mean()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a BiCQLML checkpoint")
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--seed", type=int, default=0, help="seed of the proposal samples of V(s')")
    parser.add_argument("--results", default=None, help="JSON-lines file the line is appended to")
    args = parser.parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    model = BiCQLML.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=False).eval()
    t = load_transitions(args.dataset)
    reward, target = reward_and_target(model, t, torch.Generator().manual_seed(args.seed))
    row = {"checkpoint": Path(args.checkpoint).name, "dataset": args.dataset,
           **orders(reward, target, t.rewards.astype(np.float64), t.episode_ids.astype(np.int64),
                    t.terminations.astype(bool))}
    print(json.dumps(row))
    if args.results:
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
