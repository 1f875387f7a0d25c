"""Train a policy from scratch in the environment on a BiCQL-ML reward, with Stable-Baselines3.

    bicql fit --config configs/hopper_expert_n1.yaml          # writes a checkpoint
    python examples/sac_on_learned_reward.py CHECKPOINT --env Hopper-v5 --steps 100000

The environment's reward is replaced by the checkpoint's ``RewardNet`` (with ``--shaped``,
by that reward shaped by the checkpoint's own soft value, ``ShapedReward``; with
``--survival-bonus C``, plus C per step, what staying alive pays where episodes end by
falling); termination,
truncation and the dynamics stay the environment's. At the end the policy is scored on
the *true* reward (kept by the wrapper in ``info["true_reward"]``), deterministically,
on reset seeds 10000.. . Needs ``pip install "bicql-lightning[bench]"`` (Stable-Baselines3).
"""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO, SAC

from bicql_lightning import LearnedRewardWrapper, RewardNet, ShapedReward


def true_return(model, env_id: str, seeds) -> np.ndarray:
    """Undiscounted true-reward return of the policy's deterministic actions, one episode per seed."""
    env = gym.make(env_id)
    returns = []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return np.array(returns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a BiCQLML checkpoint (.ckpt)")
    parser.add_argument("--env", default="Hopper-v5", help="Gymnasium id of the environment the reward was learned on")
    parser.add_argument("--algo", choices=("sac", "ppo"), default="sac")
    parser.add_argument("--steps", type=int, default=100_000, help="environment steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes on the true reward")
    parser.add_argument("--save", default=None, help="where to save the trained SB3 model (.zip)")
    parser.add_argument("--shaped", action="store_true",
                        help="pay r(s,a) + γV(s') - V(s) with V the checkpoint's soft value (same optimal policies)")
    parser.add_argument("--survival-bonus", type=float, default=0.0,
                        help="added to every step's learned reward (the level the likelihood leaves free)")
    args = parser.parse_args(argv)
    if not np.isfinite(args.survival_bonus):
        parser.error(f"--survival-bonus must be a finite number, got {args.survival_bonus}")

    # The two lines that matter: the learned reward, and the environment that pays it.
    reward = (ShapedReward if args.shaped else RewardNet).from_checkpoint(args.checkpoint)
    env = LearnedRewardWrapper(gym.make(args.env), reward, survival_bonus=args.survival_bonus)

    if args.algo == "sac":  # off-policy; the RL Zoo's 10k random warm-up steps for MuJoCo
        model = SAC("MlpPolicy", env, seed=args.seed, learning_starts=min(10_000, args.steps // 10), verbose=0)
    else:
        model = PPO("MlpPolicy", env, seed=args.seed, n_steps=min(2048, max(64, args.steps)), batch_size=64, verbose=0)
    model.learn(total_timesteps=args.steps)
    if args.save:
        model.save(args.save)
    returns = true_return(model, args.env, range(10_000, 10_000 + args.episodes))
    print(f"{args.algo} on the learned reward, {args.steps} steps: true return {returns.mean():.1f} "
          f"± {returns.std():.1f} over {args.episodes} episodes")


if __name__ == "__main__":
    main()
