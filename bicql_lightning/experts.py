"""Built-in controllers used to generate demonstration and offline datasets.

Every policy in this module follows one calling convention::

    action = policy(obs: np.ndarray, rng: np.random.Generator)

All randomness comes from the ``rng`` argument so that a rollout is a pure
function of the environment seed and the generator seed (see
:func:`bicql_lightning.datasets.collect_dataset`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Union

import gymnasium as gym
import numpy as np

Policy = Callable[[np.ndarray, np.random.Generator], Any]

__all__ = [
    "BUILTIN_EXPERTS",
    "MLPExpert",
    "Policy",
    "RolloutError",
    "cartpole_expert",
    "check_action",
    "epsilon_random",
    "pendulum_expert",
    "random_policy",
    "rollout",
    "sample_action",
]


def cartpole_expert(obs: np.ndarray, rng: np.random.Generator) -> int:
    """Analytic CartPole-v1 controller (scores the maximum 500 on all seeds 0..199).

    Pushes towards the side the pole falls to, with a lead term on the
    angular velocity.  The cart position / velocity terms are small and have
    the "wrong-looking" positive sign on purpose: to move the cart back to the
    centre the pole must first lean towards the centre, which is obtained by
    briefly pushing the cart *away* from it.
    """
    x, x_dot, theta, theta_dot = (float(v) for v in obs)
    u = theta + 0.5 * theta_dot + 0.05 * x + 0.1 * x_dot
    return int(u > 0.0)


# Pendulum-v1 dynamics: theta_ddot = 3g/(2l) sin(theta) + 3/(m l^2) u with
# g=10, m=l=1, i.e. theta_ddot = 15 sin(theta) + 3 u (theta = 0 is upright).
_PEND_GRAVITY = 15.0


def pendulum_expert(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Analytic Pendulum-v1 swing-up: energy pumping, then PD stabilisation.

    With ``E = 0.5 * theta_dot**2 + 15 * cos(theta)`` the dynamics give
    ``dE/dt = 3 * u * theta_dot``, so pushing along ``theta_dot`` while
    ``E < 15`` (the upright energy) pumps energy in.  Near upright a PD law
    (poles well inside the torque limit) catches and holds the pendulum.
    """
    cos_t, sin_t, theta_dot = (float(v) for v in obs)
    theta = float(np.arctan2(sin_t, cos_t))
    if cos_t > 0.85:
        u = -(10.0 * theta + 2.0 * theta_dot)
    else:
        energy = 0.5 * theta_dot**2 + _PEND_GRAVITY * cos_t
        # sign(theta_dot) with a tie-break so a pendulum at rest still moves.
        direction = 1.0 if theta_dot >= 0.0 else -1.0
        u = 2.0 * direction if energy < _PEND_GRAVITY else -0.5 * direction
    return np.array([np.clip(u, -2.0, 2.0)], dtype=np.float32)


class MLPExpert:
    """Gaussian tanh-MLP policy stored as plain ``.npz`` arrays.

    Format (two hidden tanh layers)::

        h = (obs - obs_mean) / (obs_std + 1e-6)
        h = tanh(h @ w0 + b0); h = tanh(h @ w1 + b1)
        mean = h @ w_out + b_out
        action = clip(mean + noise * exp(log_std) * N(0, I), low, high)
    """

    KEYS = ("obs_mean", "obs_std", "w0", "b0", "w1", "b1", "w_out", "b_out", "log_std")

    def __init__(
        self,
        params: Dict[str, np.ndarray],
        noise: float = 0.0,
        action_low: Optional[np.ndarray] = None,
        action_high: Optional[np.ndarray] = None,
    ) -> None:
        """Build from a dict holding every key in :attr:`KEYS`."""
        missing = [k for k in self.KEYS if k not in params]
        if missing:
            raise ValueError(f"MLP expert parameters lack arrays {missing}; need {list(self.KEYS)}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        # float64 keeps the deterministic expert bit-identical across runs/platforms.
        self.params = {k: np.asarray(params[k], dtype=np.float64) for k in self.KEYS}
        self.noise = float(noise)
        act_dim = self.params["b_out"].shape[0]
        self.low = np.full(act_dim, -np.inf) if action_low is None else np.asarray(action_low, np.float64)
        self.high = np.full(act_dim, np.inf) if action_high is None else np.asarray(action_high, np.float64)

    @classmethod
    def from_npz(
        cls,
        path: Union[str, os.PathLike],
        noise: float = 0.0,
        action_low: Optional[np.ndarray] = None,
        action_high: Optional[np.ndarray] = None,
    ) -> "MLPExpert":
        """Load an expert file written in the documented ``.npz`` format."""
        with np.load(path) as data:
            params = {k: data[k] for k in data.files}
        return cls(params, noise=noise, action_low=action_low, action_high=action_high)

    @property
    def obs_dim(self) -> int:
        """Observation size the network expects."""
        return int(self.params["w0"].shape[0])

    @property
    def act_dim(self) -> int:
        """Action size the network produces."""
        return int(self.params["b_out"].shape[0])

    def mean_action(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic (pre-noise, pre-clip) action for ``obs`` (batched or not)."""
        p = self.params
        h = (np.asarray(obs, dtype=np.float64) - p["obs_mean"]) / (p["obs_std"] + 1e-6)
        h = np.tanh(h @ p["w0"] + p["b0"])
        h = np.tanh(h @ p["w1"] + p["b1"])
        return h @ p["w_out"] + p["b_out"]

    def __call__(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sample an action; the rng is only consumed when ``noise > 0``."""
        action = self.mean_action(obs)
        if self.noise > 0.0:
            action = action + self.noise * np.exp(self.params["log_std"]) * rng.standard_normal(self.act_dim)
        return np.clip(action, self.low, self.high).astype(np.float32)


def sample_action(space: gym.Space, rng: np.random.Generator) -> Any:
    """Uniform random action from ``space`` drawn from ``rng``.

    Mirrors ``space.sample()`` but never touches the space's own generator,
    which is shared global state and would break per-episode determinism.
    """
    if isinstance(space, gym.spaces.Discrete):
        return int(space.start + rng.integers(space.n))
    if isinstance(space, gym.spaces.Box):
        low = np.asarray(space.low, dtype=np.float64)
        high = np.asarray(space.high, dtype=np.float64)
        bounded_low, bounded_high = np.isfinite(low), np.isfinite(high)
        # Same fallbacks as gymnasium for unbounded dimensions.
        out = rng.standard_normal(space.shape)
        lo_only = bounded_low & ~bounded_high
        hi_only = ~bounded_low & bounded_high
        out[lo_only] = low[lo_only] + rng.exponential(size=int(lo_only.sum()))
        out[hi_only] = high[hi_only] - rng.exponential(size=int(hi_only.sum()))
        both = bounded_low & bounded_high
        out[both] = rng.uniform(low[both], high[both])
        if np.issubdtype(space.dtype, np.integer):
            out = np.floor(out)
        return out.astype(space.dtype)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return (space.start + rng.integers(space.nvec)).astype(space.dtype)
    if isinstance(space, gym.spaces.MultiBinary):
        return rng.integers(0, 2, size=space.shape).astype(space.dtype)
    raise TypeError(f"random actions are not supported for {space!r}")


def random_policy(action_space: gym.Space) -> Policy:
    """Policy taking uniform random actions from the rng it is given."""

    def policy(obs: np.ndarray, rng: np.random.Generator) -> Any:
        return sample_action(action_space, rng)

    return policy


def epsilon_random(policy: Policy, epsilon: float, action_space: gym.Space) -> Policy:
    """Wrap ``policy`` to act uniformly at random with probability ``epsilon``.

    One uniform draw decides every step (also when ``epsilon`` is 0 or 1) so
    the rng stream only depends on the seed, not on ``epsilon``'s value.
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")

    def wrapped(obs: np.ndarray, rng: np.random.Generator) -> Any:
        if rng.random() < epsilon:
            return sample_action(action_space, rng)
        return policy(obs, rng)

    return wrapped


class RolloutError(ValueError):
    """A policy produced an action its environment cannot take, or the env misbehaved."""


def check_action(action: Any, space: gym.Space, where: str = "") -> Any:
    """Coerce a policy output to ``space``'s type, or explain precisely why it cannot be.

    Bounds are checked rather than clipped: silently clipping would store
    actions the policy never chose.
    """
    if isinstance(space, gym.spaces.Discrete):
        a = np.asarray(action)
        if a.size != 1 or not np.isfinite(a).all() or float(a.reshape(())) != int(a.reshape(())):
            raise RolloutError(f"{where}: policy returned {action!r}, expected one integer for {space}")
        value = int(a.reshape(()))
        if not space.start <= value < space.start + space.n:
            raise RolloutError(f"{where}: action {value} is outside {space}")
        return value
    if isinstance(space, gym.spaces.Box):
        a = np.asarray(action, dtype=np.float64)
        if a.shape != space.shape:
            raise RolloutError(f"{where}: policy returned an action of shape {a.shape}, "
                               f"expected {space.shape} ({space})")
        if not np.isfinite(a).all():
            raise RolloutError(f"{where}: policy returned a non-finite action {a.tolist()}")
        if (a < space.low).any() or (a > space.high).any():
            raise RolloutError(f"{where}: action {a.tolist()} is outside the bounds of {space}")
        return a.astype(space.dtype)
    if not space.contains(action):
        raise RolloutError(f"{where}: action {action!r} is not in {space}")
    return action


def rollout(env: gym.Env, policy: Policy, seed: int, where: str = "episode") -> Dict[str, Any]:
    """Run one validated episode with env and policy rng both seeded by ``seed``.

    The policy's generator is a child of ``SeedSequence(seed)``, not ``default_rng(seed)``:
    Gymnasium seeds the environment's own generator with exactly that stream, and a policy
    drawing the same numbers as a stochastic environment reuses the number that picked
    the current state (measured on a tabular MDP: an expert action of probability 0.13
    was never taken in 190 visits).

    Returns ``observations`` (T+1 stacked), ``actions`` (T stacked) and the lists
    ``rewards``, ``terminations``, ``truncations``.
    """
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(1)[0])
    obs, _ = env.reset(seed=int(seed))
    observations, actions, rewards, terms, truncs = [np.asarray(obs)], [], [], [], []
    done = False
    while not done:
        step = f"{where} step {len(actions)}"
        if not np.isfinite(observations[-1].astype(np.float64)).all():
            raise RolloutError(f"{step}: the environment returned a non-finite observation {obs!r}")
        action = check_action(policy(obs, rng), env.action_space, step)
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(np.asarray(obs))
        actions.append(np.asarray(action))
        rewards.append(float(reward))
        terms.append(bool(terminated))
        truncs.append(bool(truncated))
        done = terminated or truncated
    if not np.isfinite(observations[-1].astype(np.float64)).all():
        raise RolloutError(f"{where}: the final observation is non-finite {obs!r}")
    return dict(observations=np.stack(observations), actions=np.stack(actions), rewards=rewards,
                terminations=terms, truncations=truncs)


BUILTIN_EXPERTS: Dict[str, Policy] = {
    "CartPole-v1": cartpole_expert,
    "Pendulum-v1": pendulum_expert,
}
