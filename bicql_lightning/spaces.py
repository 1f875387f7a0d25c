"""A plain-data description of observation and action spaces.

The networks, the checkpoint and the CLI need the spaces as something YAML and
``save_hyperparameters`` can hold, so a Gymnasium space is reduced to a small dict
(:class:`SpaceSpec`). Only flat ``Box`` and ``Discrete`` spaces are supported; anything
else is refused with a message instead of failing deep inside a network.
"""

from __future__ import annotations

from typing import Any, TypedDict

import gymnasium as gym
import numpy as np


class SpaceSpec(TypedDict):
    """Spaces as plain data.

    ``obs_kind``/``action_kind`` are ``"box"`` or ``"discrete"``; ``obs_dim`` is the
    flattened Box size or the number of discrete states; ``action_dim`` the Box size or
    the number of discrete actions; ``action_low``/``action_high`` the Box bounds
    (empty for Discrete).
    """

    obs_kind: str
    obs_dim: int
    action_kind: str
    action_dim: int
    action_low: list[float]
    action_high: list[float]


def space_spec(observation_space: gym.Space, action_space: gym.Space) -> SpaceSpec:
    """Describe a pair of Gymnasium spaces; raise ``ValueError`` for unsupported ones."""
    if isinstance(observation_space, gym.spaces.Box):
        obs_kind, obs_dim = "box", int(np.prod(observation_space.shape))
    elif isinstance(observation_space, gym.spaces.Discrete):
        obs_kind, obs_dim = "discrete", int(observation_space.n)
    else:
        raise ValueError(
            f"Unsupported observation space {observation_space}: bicql-lightning handles "
            "Box and Discrete observations. Flatten the observations (e.g. with "
            "gymnasium.wrappers.FlattenObservation) when making the dataset."
        )
    if isinstance(action_space, gym.spaces.Discrete):
        return SpaceSpec(obs_kind=obs_kind, obs_dim=obs_dim, action_kind="discrete",
                         action_dim=int(action_space.n), action_low=[], action_high=[])
    if isinstance(action_space, gym.spaces.Box) and len(action_space.shape) == 1:
        low, high = action_space.low.astype(float), action_space.high.astype(float)
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError(
                f"Action space {action_space} is unbounded: the soft value of a Box action "
                "space is estimated with uniform samples on the box, which needs finite "
                "bounds. Rescale the actions to a bounded box (e.g. RescaleAction)."
            )
        return SpaceSpec(obs_kind=obs_kind, obs_dim=obs_dim, action_kind="box",
                         action_dim=int(action_space.shape[0]), action_low=low.tolist(),
                         action_high=high.tolist())
    raise ValueError(
        f"Unsupported action space {action_space}: bicql-lightning handles Discrete and "
        "one-dimensional Box action spaces."
    )


def check_spec(spec: Any) -> SpaceSpec:
    """Validate a spec that came from YAML or a checkpoint."""
    keys = set(SpaceSpec.__annotations__)
    if not isinstance(spec, dict) or set(spec) != keys:
        raise ValueError(
            f"`spaces` must be a dict with exactly the keys {sorted(keys)}, got {spec!r}. "
            "Build it with bicql_lightning.space_spec(observation_space, action_space) or "
            "let the data module provide it (OfflineIRLDataModule.spaces)."
        )
    if spec["obs_kind"] not in ("box", "discrete") or spec["action_kind"] not in ("box", "discrete"):
        raise ValueError(f"`spaces` kinds must be 'box' or 'discrete', got {spec!r}")
    return SpaceSpec(**spec)  # type: ignore[typeddict-item]
