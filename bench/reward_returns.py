"""Where a learned reward is wrong: each episode's learned return against its true return.

    python -m bench.reward_returns CKPT --data DATA --datasets bench/hopper/mixed-v0 bench/hopper/medium-v0 \\
        --out docs/img/reward_returns_hopper.png --results bench/results/v2/reward_returns.jsonl

For every episode of each dataset, the learned return is the sum of the checkpoint's
``RewardNet`` over its transitions and the true return the sum of the dataset's rewards.
One scatter panel per dataset, episodes coloured by length, with Spearman's correlation
(the protocol's reward-recovery metric) and two diagnostics of *what* the reward pays
for: the Spearman correlation of the learned return with the episode's length, and of
the learned *per-step mean* with the true per-step mean (speed and posture, not survival).
For a bounded reward it also gives the share of transitions within 0.01 of the bound's floor:
there the reward is flat, so an RL learner on it gets no signal which way to go.

Where most episodes are paid almost nothing, the return Spearman is decided by the order of
those near-zero sums. ``episodes_paid_little`` counts the episodes whose learned return is
below 1 % of the dataset's highest, and the Spearman correlation is also given among them
and among the rest: a reward can rank the episodes it pays for well and the others poorly.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from bench.run import spearman
from bicql_lightning import RewardNet, load_transitions


@torch.no_grad()
def episode_returns(net: RewardNet, dataset_id: str) -> dict[str, np.ndarray]:
    """Per episode: learned return, true return, length and transitions at the reward's floor."""
    t = load_transitions(dataset_id)
    learned = net(torch.as_tensor(t.observations), torch.as_tensor(t.actions)).double().numpy()
    episodes = t.episode_ids.astype(np.int64)
    floor = float(net.offset) - net.reward_bound if net.reward_bound > 0 else -np.inf
    return {"learned": np.bincount(episodes, weights=learned),
            "true": np.bincount(episodes, weights=t.rewards.astype(np.float64)),
            "length": np.bincount(episodes).astype(np.float64),
            "at_floor": np.bincount(episodes, weights=(learned < floor + 0.01).astype(np.float64))}


def diagnostics(ep: dict[str, np.ndarray]) -> dict[str, float]:
    return {"return_spearman": spearman(ep["learned"], ep["true"]),
            "learned_return_vs_length_spearman": spearman(ep["learned"], ep["length"]),
            "true_return_vs_length_spearman": spearman(ep["true"], ep["length"]),
            "per_step_spearman": spearman(ep["learned"] / ep["length"], ep["true"] / ep["length"]),
            "learned_per_step_mean": float(ep["learned"].sum() / ep["length"].sum()),
            "share_at_floor": float(ep["at_floor"].sum() / ep["length"].sum()),
            "episodes": int(len(ep["true"])),
            **paid_little(ep)}


PAID_LITTLE = 0.01  # of the highest learned episode return


def paid_little(ep: dict[str, np.ndarray]) -> dict[str, float | int | None]:
    """The episodes paid under :data:`PAID_LITTLE` of the best one's learned return, and the
    return Spearman among them and among the rest (``None`` for fewer than three episodes)."""
    top = float(ep["learned"].max())
    little = ep["learned"] < PAID_LITTLE * top if top > 0 else np.zeros(len(ep["learned"]), bool)

    def within(mask: np.ndarray) -> float | None:
        return spearman(ep["learned"][mask], ep["true"][mask]) if mask.sum() >= 3 else None

    return {"episodes_paid_little": int(little.sum()), "return_spearman_paid_little": within(little),
            "return_spearman_rest": within(~little)}


def plot(panels: dict[str, dict[str, np.ndarray]], stats: dict[str, dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (name, ep) in zip(axes[0], panels.items()):
        sc = ax.scatter(ep["true"], ep["learned"], c=ep["length"], cmap="viridis", s=14)
        s = stats[name]
        ax.set_title(f"{name}\nSpearman {s['return_spearman']:.2f} (vs length {s['learned_return_vs_length_spearman']:.2f}, "
                     f"per step {s['per_step_spearman']:.2f})", fontsize=9)
        ax.set_xlabel("true episode return")
        ax.set_ylabel("learned episode return")
        ax.axhline(0, color="gray", lw=0.6)
        fig.colorbar(sc, ax=ax, label="episode length")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a BiCQLML checkpoint")
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--out", required=True, help="PNG path")
    parser.add_argument("--title", default=None)
    parser.add_argument("--results", default=None, help="JSON-lines file the diagnostics are appended to")
    args = parser.parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    net = RewardNet.from_checkpoint(args.checkpoint)
    panels = {d: episode_returns(net, d) for d in args.datasets}
    stats = {d: diagnostics(ep) for d, ep in panels.items()}
    plot(panels, stats, args.title or Path(args.checkpoint).stem, Path(args.out))
    for d, s in stats.items():
        print(f"{d}: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
        if args.results:
            with open(args.results, "a") as f:
                f.write(json.dumps({"checkpoint": Path(args.checkpoint).name, "dataset": d, **stats[d]}) + "\n")


if __name__ == "__main__":
    main()
