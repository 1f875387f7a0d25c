"""Callbacks: target-network syncing, fitting the acting policy, rollout evaluation.

All count *updates* (the module's ``updates``, one per ``training_step``), not
Lightning's ``global_step``, which under manual optimisation counts every optimizer step.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

from .distributed import broadcast_, is_distributed
from .networks import polyak_update


class TargetNetworkUpdate(Callback):
    r"""Keep ``target_q_net`` behind ``q_net``.

    Args:
        tau: Polyak rate, :math:`\bar\phi \leftarrow (1-\tau)\bar\phi + \tau\phi` after every update.
        hard_every_n_updates: if set, copy the weights outright every N updates instead.
    """

    def __init__(self, tau: float = 0.005, hard_every_n_updates: int | None = None):
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
        if hard_every_n_updates is not None and hard_every_n_updates < 1:
            raise ValueError(f"hard_every_n_updates must be at least 1, got {hard_every_n_updates}")
        self.tau = tau
        self.hard_every_n_updates = hard_every_n_updates

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if getattr(pl_module, "target_q_net", None) is None:
            return  # a module without a target network (behaviour cloning): nothing to sync
        if getattr(pl_module, "draws_own_batches", False):
            return  # a captured iteration (capture_graph) takes this Polyak step itself
        if self.hard_every_n_updates is not None:
            if pl_module.updates % self.hard_every_n_updates == 0:
                polyak_update(pl_module.target_q_net, pl_module.q_net, 1.0)
        else:
            polyak_update(pl_module.target_q_net, pl_module.q_net, self.tau)


class FitPolicy(Callback):
    """Fit the module's acting ``policy`` to data: before training and after the last epoch.

    Before the first update, ``policy.fit`` (the default controller fits its prior to the
    demonstrations; a policy a checkpoint already holds fitted is left alone). After the
    last epoch, before the final rollout evaluation and the last checkpoint,
    ``policy.refit`` with the final learned reward (the default controller refits its prior
    to D, weighted by the soft advantages, where D_E's demonstrations are sparse; a run
    resumed past that point refits with its new reward).
    Both draw from the module's random stream and are broadcast from rank 0 under DDP.
    BiCQLML adds this callback itself unless one is configured.
    """

    def _sync(self, trainer: Trainer, policy: torch.nn.Module) -> None:
        if is_distributed(trainer.world_size):
            # Every rank fitted the same data with the same stream; make the copies identical
            # even where a device's kernels are not bit-reproducible.
            broadcast_(list(policy.parameters()), src=0)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        policy = getattr(pl_module, "policy", None)
        if policy is None or not getattr(policy, "needs_fit", False):
            return
        if not hasattr(trainer.datamodule, "pairs"):
            raise ValueError(f"Fitting {type(policy).__name__} needs the data: pass an OfflineIRLDataModule to fit.")
        policy.fit(trainer.datamodule, pl_module._rng())
        self._sync(trainer, policy)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        policy = getattr(pl_module, "policy", None)
        if policy is None or not hasattr(policy, "refit") or not _last_epoch(trainer):
            return
        metrics = refit_policy(pl_module, trainer.datamodule)
        self._sync(trainer, policy)
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=False, on_epoch=True)


def refit_policy(pl_module: LightningModule, datamodule: Any) -> dict[str, Any]:
    """``policy.refit`` with the module's final learned reward (and soft advantages, where
    the policy's refit takes them), from the module's stream: FitPolicy's end of training."""
    policy = pl_module.policy
    kwargs = {}
    if "advantage" in inspect.signature(policy.refit).parameters and hasattr(pl_module, "soft_advantages"):
        kwargs["advantage"] = pl_module.soft_advantages
    return policy.refit(datamodule, pl_module.learned_rewards, pl_module._rng(), **kwargs)


def _last_epoch(trainer: Trainer) -> bool:
    """Whether training stops after this epoch (Lightning's own stopping rules, read at
    ``on_train_epoch_end``, where the epoch already counts as processed)."""
    loop = trainer.fit_loop
    return bool(trainer.should_stop
                or (loop.max_steps is not None and loop.max_steps >= 0 and trainer.global_step >= loop.max_steps)
                or (loop.max_epochs is not None and loop.max_epochs >= 0
                    and loop.epoch_progress.current.processed >= loop.max_epochs))


def rollout_returns(envs: list[gym.Env], act: Callable[[np.ndarray], np.ndarray],
                    seeds: list[int]) -> np.ndarray:
    """Undiscounted returns of one episode per environment, stepped in lockstep.

    Environment ``k`` resets with ``seeds[k]``; ``act`` gets the stacked observations of
    the episodes still running, so the policy runs once per time step, not once per
    environment step.
    """
    return rollout_episodes(envs, act, seeds)["return"]


def rollout_episodes(envs: list[gym.Env], act: Callable[[np.ndarray], np.ndarray], seeds: list[int],
                     info_keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """``rollout_returns``'s episodes, with their ``"length"`` and, per name in ``info_keys``,
    the sum over the episode of that entry of the step's ``info`` (NaN where a step lacks it):
    what a reward wrapper keeps beside the reward it pays (``"true_reward"``) or what the
    environment reports (MuJoCo's ``"x_velocity"``)."""
    obs = [env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)]
    sums = {name: np.zeros(len(envs)) for name in ("return", "length", *info_keys)}
    running = list(range(len(envs)))
    while running:
        actions = act(np.stack([obs[k] for k in running]))
        still = []
        for k, action in zip(running, actions):
            obs[k], reward, terminated, truncated, info = envs[k].step(action)
            sums["return"][k] += float(reward)
            sums["length"][k] += 1
            for name in info_keys:
                sums[name][k] += float(info.get(name, np.nan))
            if not (terminated or truncated):
                still.append(k)
        running = still
    return sums


def _revision(pl_module: LightningModule) -> int:
    """How many times the module's controller was refitted: a refit changes what ``act`` does."""
    return int(getattr(getattr(pl_module, "policy", None), "revision", 0))


def normalized_score(ret: float, random_return: float | None, expert_return: float | None) -> float | None:
    """100·(R − R_random)/(R_expert − R_random), or ``None`` where a reference is unknown."""
    if random_return is None or expert_return is None or expert_return == random_return:
        return None
    return 100.0 * (ret - random_return) / (expert_return - random_return)


class RolloutEvaluation(Callback):
    """Run the module's ``act`` in the environment every N updates and at the end of fit.

    The environment is the one recorded in the expert dataset (Minari metadata) unless
    ``env_id`` is given. Episodes reset with seeds ``seed, seed+1, …``. Reference returns
    come from the dataset metadata unless given here. At the end of fit it prints the
    learned controller's return next to the references and, when a logger is set,
    writes ``rollout_summary.json`` into its directory.

    Args:
        every_n_updates: evaluate every N updates (``0``: only at the end).
        episodes: evaluation episodes.
        seed: reset seed of the first episode.
        env_id: Gymnasium id overriding the dataset's environment.
        env_kwargs: keyword arguments for ``gym.make``.
        deterministic: act greedily (argmax / best candidate).
        random_return: R_random override.
        expert_return: R_expert override.
        at_end: evaluate (if not just done) and print the summary when fit ends.
    """

    def __init__(self, every_n_updates: int = 5000, episodes: int = 10, seed: int = 10000,
                 env_id: str | None = None, env_kwargs: dict[str, Any] | None = None,
                 deterministic: bool = True, random_return: float | None = None,
                 expert_return: float | None = None, at_end: bool = True):
        if episodes < 1:
            raise ValueError(f"episodes must be at least 1, got {episodes}")
        self.every_n_updates = every_n_updates
        self.episodes = episodes
        self.seed = seed
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.deterministic = deterministic
        self.random_return = random_return
        self.expert_return = expert_return
        self.at_end = at_end
        self.last: dict[str, Any] | None = None

    def _make_env(self, datamodule: Any) -> gym.Env:
        if self.env_id is not None:
            return gym.make(self.env_id, **self.env_kwargs)
        spec = getattr(datamodule, "env_spec", None)
        if spec is None:
            raise ValueError(
                "RolloutEvaluation cannot tell which environment to run: the expert dataset "
                "records none. Pass env_id (e.g. --trainer.callbacks.init_args.env_id Hopper-v5)."
            )
        return gym.make(spec, **self.env_kwargs)

    def _references(self, datamodule: Any) -> tuple[float | None, float | None]:
        dm_random, dm_expert = getattr(datamodule, "ref_scores", (None, None))
        random_return = self.random_return if self.random_return is not None else dm_random
        expert_return = self.expert_return if self.expert_return is not None else dm_expert
        return random_return, expert_return

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """Roll out on rank 0 and broadcast, so every rank logs the same numbers."""
        result = self.evaluate_module(pl_module, trainer.datamodule) if trainer.is_global_zero else None
        result = trainer.strategy.broadcast(result, src=0)
        self.last = result
        return result

    def evaluate_module(self, pl_module: LightningModule, datamodule: Any = None) -> dict[str, Any]:
        """Roll out ``pl_module.act`` in this process, without a Trainer (``datamodule``
        names the environment and the reference returns unless given here)."""
        envs = [self._make_env(datamodule) for _ in range(self.episodes)]
        threads = torch.get_num_threads()
        # Rollout batches are a handful of observations: intra-op threads only add
        # wake-up latency (tens of ms per call when the other cores are busy).
        torch.set_num_threads(1)
        try:
            returns = rollout_returns(envs, lambda obs: pl_module.act(obs, deterministic=self.deterministic),
                                      seeds=list(range(self.seed, self.seed + self.episodes)))
        finally:
            torch.set_num_threads(threads)
            for env in envs:
                env.close()
        random_return, expert_return = self._references(datamodule)
        mean = float(np.mean(returns))
        return {"updates": int(pl_module.updates), "policy_revision": _revision(pl_module),
                "updates_per_sec": float(getattr(pl_module, "updates_per_sec", float("nan"))),
                "return": mean, "return_std": float(np.std(returns)),
                "returns": [float(r) for r in returns], "random_return": random_return,
                "expert_return": expert_return,
                "normalized_score": normalized_score(mean, random_return, expert_return)}

    @staticmethod
    def _metrics(result: dict[str, Any]) -> dict[str, float]:
        metrics = {"eval/return": result["return"], "eval/return_std": result["return_std"]}
        if result["normalized_score"] is not None:
            metrics["eval/normalized_score"] = result["normalized_score"]
        return metrics

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.every_n_updates > 0 and pl_module.updates % self.every_n_updates == 0:
            result = self.evaluate(trainer, pl_module)
            for name, value in self._metrics(result).items():
                pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "eval/return")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_end:
            return
        if (self.last is None or self.last["updates"] != pl_module.updates
                or self.last.get("policy_revision") != _revision(pl_module)):  # refitted since
            self.evaluate(trainer, pl_module)
            if trainer.logger is not None:
                trainer.logger.log_metrics(self._metrics(self.last), step=trainer.global_step)
        # Only beside a logger's files: without a logger there is no run directory, and the
        # user's working directory is not ours to write into. Trainer.log_dir is a broadcast
        # under DDP, so every rank must ask for it, not rank 0 alone.
        log_dir = trainer.log_dir if trainer.logger is not None else None
        if trainer.is_global_zero:
            print(self.summary(self.last), flush=True)
            if log_dir is not None:
                os.makedirs(log_dir, exist_ok=True)
                with open(os.path.join(log_dir, "rollout_summary.json"), "w") as fh:
                    json.dump(self.last, fh, indent=2)

    def summary(self, result: dict[str, Any]) -> str:
        def fmt(value: float | None) -> str:
            return "unknown" if value is None else f"{value:.1f}"

        seeds = f"seeds {self.seed}..{self.seed + self.episodes - 1}"
        score = fmt(result["normalized_score"])
        if result["normalized_score"] is None:
            score += (" (no reference returns: give RolloutEvaluation random_return and expert_return, e.g. "
                      "init_args: {random_return: 9.3, expert_return: 500}, or make the dataset with "
                      "`bicql dataset ... --ref-max-score R_EXPERT`)")
        return "\n".join([
            f"Rollout evaluation after {result['updates']} updates ({self.episodes} episodes, {seeds}):",
            f"  learned controller return: {result['return']:.1f} ± {result['return_std']:.1f}",
            f"  expert return:             {fmt(result['expert_return'])}",
            f"  random return:             {fmt(result['random_return'])}",
            f"  normalised score:          {score}",
            f"  training throughput:       {result['updates_per_sec']:.1f} updates/s",
        ])


class ProgressLine(Callback):
    """One plain line every ``every_n_updates`` updates: for output that is not a terminal,
    where a progress bar shows up only when training ends. ``bicql fit`` uses it then.

    ``update 1000/5000 (20%) | 9.3 updates/s | eval return 3120.4 (normalised 85.2) at 1000``
    """

    def __init__(self, every_n_updates: int = 500):
        if every_n_updates < 1:
            raise ValueError(f"every_n_updates must be at least 1, got {every_n_updates}")
        self.every_n_updates = every_n_updates

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"{type(pl_module).__name__}: training {self._total(trainer) or '?'} updates "
                  f"(a line every {self.every_n_updates})", flush=True)

    @staticmethod
    def _total(trainer: Trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return None  # optimizer steps, not updates
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            return None
        return int(trainer.max_epochs * trainer.num_training_batches)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        updates = int(getattr(pl_module, "updates", trainer.global_step))
        if updates % self.every_n_updates or not trainer.is_global_zero:
            return
        total = self._total(trainer)
        parts = [f"update {updates}/{total} ({100 * updates / total:.0f}%)" if total else f"update {updates}",
                 f"{float(getattr(pl_module, 'updates_per_sec', float('nan'))):.1f} updates/s"]
        evaluation = next((cb.last for cb in trainer.callbacks if isinstance(cb, RolloutEvaluation) and cb.last),
                          None)
        if evaluation is not None:
            score = evaluation["normalized_score"]
            parts.append(f"eval return {evaluation['return']:.1f}"
                         + (f" (normalised {score:.1f})" if score is not None else "")
                         + f" at {evaluation['updates']}")
        print(" | ".join(parts), flush=True)


class QuietProgressBar(TQDMProgressBar):
    """Lightning's progress bar without the logger's version number (``v_num``), which says
    nothing about training."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
