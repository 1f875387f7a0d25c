"""The learned reward r_θ(s, a) as a reusable network, and a Gymnasium wrapper for it.

``RewardNet`` owns its observation normalisation, so a copy taken out of a checkpoint
(``RewardNet.from_checkpoint(path)``) scores raw environment observations on its own,
with no data module or Lightning module around it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from .networks import ObservationEncoder, float32_head, mlp
from .spaces import SpaceSpec, check_spec

CHECKPOINT_KEY = "bicql_lightning"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another model."""


def read_checkpoint(path: str | os.PathLike, expected_model: str | None = None) -> dict[str, Any]:
    """Load a checkpoint file and check that it was written by a bicql-lightning module."""
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint {os.fspath(path)!r} does not exist: check the path (`--ckpt_path last` "
                              "resumes a run's own last checkpoint, or starts one where there is none).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CheckpointError(f"Checkpoint {os.fspath(path)!r} cannot be read: it is truncated or not a checkpoint "
                              f"({type(err).__name__}: {err}). Use an earlier checkpoint of the run (writes are "
                              "atomic, so the previous last.ckpt is whole).") from err
    check_checkpoint_model(checkpoint, expected_model, os.fspath(path))
    return checkpoint


def check_checkpoint_model(checkpoint: dict, expected_model: str | None, where: str = "checkpoint") -> None:
    info = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    found = info.get("model") if isinstance(info, dict) else None
    if found is None:
        raise CheckpointError(
            f"{where} was not written by a bicql-lightning model (it has no "
            f"'{CHECKPOINT_KEY}' entry). Pass a checkpoint saved by training BiCQLML or one "
            "of the baselines of this package."
        )
    if expected_model is not None and found != expected_model:
        raise CheckpointError(
            f"{where} holds a {found} model, not a {expected_model}. Load it with "
            f"{found}.load_from_checkpoint, or pass a {expected_model} checkpoint."
        )


class RewardNet(nn.Module):
    r"""Learned reward :math:`r_\theta(s, a)`.

    ``forward(state, action, next_state=None, done=None) -> (B,)`` (the signature of
    imitation's ``RewardNet``; this reward depends on ``(s, a)`` only), ``predict`` the
    same on numpy arrays. With ``reward_bound > 0`` the output is
    :math:`b\tanh(\text{raw}/b) + o`: bounding the reward pins the neutral direction
    :math:`(Q + c, r + (1-\gamma)c)` of the bi-level loop, along which Q and r could
    otherwise drift together without limit. The offset :math:`o` (a buffer, saved with
    the weights) places that range relative to termination: :math:`o = b` keeps every
    reward in :math:`[0, 2b]`, so ending an episode never pays (``BiCQLML``'s
    ``termination="failure"``).
    """

    def __init__(self, spaces: SpaceSpec, hidden_sizes: Sequence[int] = (256, 256),
                 reward_bound: float = 0.0, offset: float = 0.0):
        super().__init__()
        self.spaces = check_spec(dict(spaces))
        self.discrete = self.spaces["action_kind"] == "discrete"
        self.reward_bound = float(reward_bound)
        self.hidden_sizes = list(hidden_sizes)
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.encoder = ObservationEncoder(self.spaces["obs_kind"], self.spaces["obs_dim"])
        obs_dim, act_dim = self.spaces["obs_dim"], self.spaces["action_dim"]
        if self.discrete:
            self.net = mlp(obs_dim, hidden_sizes, act_dim)
        else:
            self.net = mlp(obs_dim + act_dim, hidden_sizes, 1)
            low = torch.tensor(self.spaces["action_low"], dtype=torch.float32)
            high = torch.tensor(self.spaces["action_high"], dtype=torch.float32)
            self.register_buffer("action_center", (high + low) / 2)
            self.register_buffer("action_half", (high - low) / 2)

    def _bound(self, raw: Tensor) -> Tensor:
        if self.reward_bound > 0:
            raw = self.reward_bound * torch.tanh(raw / self.reward_bound)
        return raw + self.offset.to(raw.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved before the offset existed are rewards without one.
        state_dict.setdefault(prefix + "offset", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reward_table(self, state: Tensor) -> Tensor:
        """Rewards of every action, ``(B, A)``; Discrete action spaces only."""
        if not self.discrete:
            raise ValueError("reward_table needs a Discrete action space")
        return self._bound(float32_head(self.net, self.encoder(state)))

    def logit(self, state: Tensor, action: Tensor) -> Tensor:
        """The network's output before the bound, ``(B,)``: the same order as ``forward``,
        kept where the bound's floor rounds many rewards to one value."""
        if self.discrete:
            table = float32_head(self.net, self.encoder(state))  # (B, A)
            return table.gather(1, action.long().reshape(-1, 1)).squeeze(1)
        unit = (action.reshape(action.shape[0], -1).to(self.action_half.dtype)
                - self.action_center) / self.action_half
        return float32_head(self.net, torch.cat([self.encoder(state), unit], dim=-1)).squeeze(-1)

    def forward(self, state: Tensor, action: Tensor, next_state: Tensor | None = None,
                done: Tensor | None = None) -> Tensor:
        return self._bound(self.logit(state, action))

    @torch.no_grad()
    def predict(self, state: np.ndarray, action: np.ndarray, next_state: np.ndarray | None = None,
                done: np.ndarray | None = None) -> np.ndarray:
        """``forward`` on numpy arrays (batched, or one transition), returning numpy."""
        state_t, action_t, single = self.batch(state, action)
        out = self(state_t, action_t).cpu().numpy()
        return out[0] if single else out

    def batch(self, state: Any, action: Any) -> tuple[Tensor, Tensor, bool]:
        """Numpy pair(s) as a batch on this network's device, and whether one came unbatched."""
        device = next(self.parameters()).device
        state_t = torch.as_tensor(np.asarray(state), device=device)
        action_t = torch.as_tensor(np.asarray(action), device=device)
        single = state_t.dim() == (0 if self.spaces["obs_kind"] == "discrete" else 1)
        if single:
            state_t, action_t = state_t.unsqueeze(0), action_t.reshape(1, -1)
        return state_t, action_t, single

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, attribute: str = "reward_net") -> RewardNet:
        """The reward network of a checkpoint written by ``BiCQLML``, in one call.

        (IQ-Learn keeps no reward network: its reward is ``IQLearn.reward``.)
        """
        checkpoint = read_checkpoint(path)
        info = checkpoint[CHECKPOINT_KEY]
        if "reward_net" not in info:
            raise CheckpointError(
                f"Checkpoint {os.fspath(path)!r} holds a {info['model']} model, which learns "
                "no reward network. Pass a BiCQLML checkpoint."
            )
        net = cls(**info["reward_net"])
        prefix = attribute + "."
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        net.load_state_dict(state)
        return net.eval()


class LearnedRewardWrapper(gym.Wrapper):
    """Replace an environment's reward with a learned one.

    ``reward_net`` is a :class:`RewardNet` or any object with imitation's
    ``predict(state, action, next_state, done)``, called with one transition at a time
    (e.g. an adapter around :meth:`IQLearn.predict_reward`, whose reward needs
    :math:`s'`). The environment's own reward is kept in ``info["true_reward"]``;
    termination and truncation are the environment's.

    ``survival_bonus`` is added to every step's learned reward. The expert's likelihood
    leaves a constant per step free, so this is the user's choice, not the reward's: on a
    task that never ends early it changes nothing, and on one that ends when the agent
    falls it is what staying alive pays (hopper's own reward pays 1 per step for it).
    """

    def __init__(self, env: gym.Env, reward_net: RewardNet | Any, survival_bonus: float = 0.0):
        super().__init__(env)
        self.reward_net = reward_net.eval() if isinstance(reward_net, nn.Module) else reward_net
        self.survival_bonus = float(survival_bonus)
        if not np.isfinite(self.survival_bonus):
            raise ValueError(f"survival_bonus must be a finite number of reward per step, got {survival_bonus!r}")
        self._last_obs: Any = None

    def reset(self, **kwargs: Any):
        obs, info = self.env.reset(**kwargs)
        self._last_obs = obs
        return obs, info

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        learned = float(np.asarray(self.reward_net.predict(self._last_obs, np.asarray(action), obs,
                                                           np.asarray(terminated))).reshape(-1)[0])
        info = dict(info, true_reward=reward)
        self._last_obs = obs
        return obs, learned + self.survival_bonus, terminated, truncated, info
