r"""Small tabular MDPs as Gymnasium environments, and their exact solutions.

Every environment here has Discrete observations (the state index) and Discrete actions
and exposes its model as arrays:

* ``P``: transition tensor ``(S, A, S)``, ``P[s, a, s'] = Pr(s' | s, a)``;
* ``R``: reward table ``(S, A)`` (the reward the environment emits for ``a`` in ``s``);
* ``mu0``: initial state distribution ``(S,)``.

None of them terminates: the tasks are continuing and discounted, and the registered ids
add a time limit (a truncation, which BiCQL-ML bootstraps through), so the exact
infinite-horizon solutions below are the quantities the learner estimates.

Registered ids (``gymnasium.make`` or an id string to
:func:`bicql_lightning.datasets.collect_dataset`; the stored ``EnvSpec`` carries the
keyword arguments, so Minari's ``recover_environment`` rebuilds the same MDP):

* ``bicql/GridWorld-v0``: :class:`GridWorld` (8x8, walls, a goal, two lava cells, slip
  probability ``slip``, default 0: deterministic), time limit 50;
* ``bicql/Garnet-v0``: :class:`Garnet` (``seed``, ``S``, ``A``, ``b``), time limit 50.

Exact solvers (numpy, float64): :func:`soft_value_iteration` (soft-optimal ``Q*``, ``V*``
and the Boltzmann policy ``pi*`` at temperature ``T`` and discount ``gamma``),
:func:`policy_evaluation` (discounted return ``J(pi)`` under a reward, ``V^pi`` and the
normalised discounted state occupancy) and :func:`state_visitation` (the mean state
distribution over the first ``H`` steps: where the states of ``H``-step episodes come from).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np

__all__ = [
    "GARNET_ID", "GRIDWORLD_ID", "Garnet", "GridWorld", "TabularEnv", "boltzmann_policy",
    "policy_evaluation", "soft_value_iteration", "state_visitation", "tabular_policy",
    "uniform_policy",
]

GRIDWORLD_ID = "bicql/GridWorld-v0"
GARNET_ID = "bicql/Garnet-v0"
MAX_EPISODE_STEPS = 50


class TabularEnv(gym.Env):
    """A finite MDP given by ``P`` ``(S, A, S)``, ``R`` ``(S, A)`` and ``mu0`` ``(S,)``.

    Observations are the state index (``Discrete(S)``), actions ``Discrete(A)``; the reward
    of ``a`` in ``s`` is ``R[s, a]`` whatever the next state; episodes never terminate.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, P: np.ndarray, R: np.ndarray, mu0: np.ndarray):
        P, R, mu0 = (np.asarray(x, dtype=np.float64) for x in (P, R, mu0))
        S, A = R.shape
        if P.shape != (S, A, S) or mu0.shape != (S,):
            raise ValueError(f"P must be (S, A, S) = {(S, A, S)} and mu0 (S,); got {P.shape}, {mu0.shape}")
        if not (np.allclose(P.sum(-1), 1.0) and np.isclose(mu0.sum(), 1.0)) or (P < 0).any() or (mu0 < 0).any():
            raise ValueError("P[s, a] and mu0 must be probability distributions")
        self.P, self.R, self.mu0 = P, R, mu0
        self.num_states, self.num_actions = S, A
        self.observation_space = gym.spaces.Discrete(S)
        self.action_space = gym.spaces.Discrete(A)
        self._cdf = np.cumsum(P, axis=-1)
        self._state = 0
        self._rng: np.random.Generator | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # The dynamics draw from their own stream, not from ``np_random``: gymnasium seeds
        # ``np_random`` as ``PCG64(SeedSequence(seed))``, the very stream of
        # ``np.random.default_rng(seed)`` that ``collect_dataset`` hands the policy for the
        # same episode, so each action would reuse the uniform that drew the current state
        # (measured: an action of probability 0.13 never taken in 190 visits).
        if seed is not None:
            self._rng = np.random.default_rng([int(seed), 0x7AB1E])
        elif self._rng is None:
            self._rng = np.random.default_rng(self.np_random.integers(2**63))
        self._state = int(self._rng.choice(self.num_states, p=self.mu0))
        return self._state, {}

    def step(self, action: Any):
        s, a = self._state, int(action)
        reward = float(self.R[s, a])
        # Inverse-CDF draw: one uniform per step, clipped against float round-off.
        s_next = int(min(np.searchsorted(self._cdf[s, a], self._rng.random(), side="right"),
                         self.num_states - 1))
        self._state = s_next
        return s_next, reward, False, False, {}


# ------------------------------------------------------------------ gridworld
DEFAULT_LAYOUT = (
    "H.......",
    "..#.....",
    "..#..L..",
    "..#.....",
    ".....##.",
    ".L...#..",
    "..#..#G.",
    "........",
)
MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # up, right, down, left
ARROWS = "^>v<"


class GridWorld(TabularEnv):
    """A grid with walls ``#``, a goal ``G``, lava ``L`` and a home cell ``H``.

    Actions move up/right/down/left; with probability ``slip`` the move goes in a
    uniformly random direction instead (``slip = 0``: deterministic). Moving into a wall
    or off the grid stays put. Any action at the goal earns ``goal_reward`` (default 20,
    sized so that at temperature 1 and gamma 0.9 the soft-optimal expert heads for the
    goal from across the grid) and moves to
    the home cell (a continuing task: the agent goes round again); any action on lava
    costs ``lava_reward``; everything else earns 0. Episodes start uniformly on the free
    cells (``.`` and ``H``). Wall cells are states (index ``row * width + col``) that are
    never entered; they self-loop with zero reward.
    """

    def __init__(self, layout: Sequence[str] = DEFAULT_LAYOUT, slip: float = 0.0,
                 goal_reward: float = 20.0, lava_reward: float = -10.0):
        grid = [list(row) for row in layout]
        h, w = len(grid), len(grid[0])
        if any(len(row) != w for row in grid) or not 0.0 <= slip <= 1.0:
            raise ValueError("layout rows must have equal length and slip must be in [0, 1]")
        cells = {c: [(i, j) for i in range(h) for j in range(w) if grid[i][j] == c] for c in "#GLH."}
        if len(cells["G"]) != 1 or len(cells["H"]) != 1:
            raise ValueError("the layout needs exactly one goal G and one home cell H")
        S, A = h * w, len(MOVES)
        idx = lambda i, j: i * w + j  # noqa: E731
        P, R = np.zeros((S, A, S)), np.zeros((S, A))
        goal, home = idx(*cells["G"][0]), idx(*cells["H"][0])
        for i in range(h):
            for j in range(w):
                s = idx(i, j)
                if grid[i][j] == "#":
                    P[s, :, s] = 1.0
                    continue
                if s == goal:
                    P[s, :, home], R[s, :] = 1.0, goal_reward
                    continue
                if grid[i][j] == "L":
                    R[s, :] = lava_reward
                for a in range(A):
                    for m, (di, dj) in enumerate(MOVES):
                        p = (1.0 - slip) * (m == a) + slip / A
                        if p == 0.0:
                            continue
                        ni, nj = i + di, j + dj
                        blocked = not (0 <= ni < h and 0 <= nj < w) or grid[ni][nj] == "#"
                        P[s, a, s if blocked else idx(ni, nj)] += p
        starts = [idx(i, j) for i, j in cells["."] + cells["H"]]
        mu0 = np.zeros(S)
        mu0[starts] = 1.0 / len(starts)
        super().__init__(P, R, mu0)
        self.layout, self.height, self.width, self.slip = tuple(layout), h, w, slip
        self.goal, self.home = goal, home
        self.walls = np.array([grid[i][j] == "#" for i in range(h) for j in range(w)])

    def coords(self, s: int) -> tuple[int, int]:
        """``(row, col)`` of state ``s``."""
        return divmod(int(s), self.width)

    def as_grid(self, values: np.ndarray) -> np.ndarray:
        """Per-state values ``(S,)`` as a ``(height, width)`` array, walls set to NaN (for plots)."""
        grid = np.asarray(values, dtype=np.float64).reshape(self.height, self.width).copy()
        grid[self.walls.reshape(self.height, self.width)] = np.nan
        return grid


# ------------------------------------------------------------------ Garnet
class Garnet(TabularEnv):
    """A seeded random Garnet MDP (Archibald et al. 1995): ``S`` states, ``A`` actions,
    branching ``b``.

    Each ``(s, a)`` moves to ``b`` distinct next states drawn without replacement, with
    probabilities given by a uniform random partition of [0, 1] (``b - 1`` sorted uniform
    cut points). Rewards ``R[s, a]`` are i.i.d. ``N(0, reward_scale^2)``; episodes start
    uniformly on all states. Everything is a function of ``seed``.
    """

    def __init__(self, seed: int = 0, S: int = 30, A: int = 4, b: int = 3, reward_scale: float = 1.0):
        if not (1 <= b <= S and A >= 1):
            raise ValueError(f"need 1 <= b <= S and A >= 1, got S={S}, A={A}, b={b}")
        rng = np.random.default_rng(seed)
        P = np.zeros((S, A, S))
        for s in range(S):
            for a in range(A):
                nxt = rng.choice(S, size=b, replace=False)
                cuts = np.sort(rng.random(b - 1))
                P[s, a, nxt] = np.diff(np.concatenate([[0.0], cuts, [1.0]]))
        R = rng.standard_normal((S, A)) * reward_scale
        super().__init__(P, R, np.full(S, 1.0 / S))
        self.seed_, self.b = seed, b


def _register() -> None:
    specs = {GRIDWORLD_ID: ("bicql_lightning.tabular:GridWorld", {"slip": 0.0}),
             GARNET_ID: ("bicql_lightning.tabular:Garnet", {"seed": 0, "S": 30, "A": 4, "b": 3})}
    for env_id, (entry_point, kwargs) in specs.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=entry_point, max_episode_steps=MAX_EPISODE_STEPS, kwargs=kwargs)


_register()


# ------------------------------------------------------------------ exact solvers
def boltzmann_policy(Q: np.ndarray, temperature: float) -> np.ndarray:
    """``pi(a|s) = exp((Q(s, a) - V(s)) / T)``, ``(S, A)``."""
    z = Q / temperature
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def _soft_max(Q: np.ndarray, temperature: float) -> np.ndarray:
    m = Q.max(1)
    return m + temperature * np.log(np.exp((Q - m[:, None]) / temperature).sum(1))


def soft_value_iteration(P: np.ndarray, R: np.ndarray, gamma: float, temperature: float,
                         tol: float = 1e-10, max_iter: int = 100_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Soft-optimal ``(Q*, V*, pi*)`` of the discounted MDP ``(P, R, gamma)`` at temperature ``T``.

    Iterates :math:`Q = R + \gamma P V`, :math:`V(s) = T\log\sum_a\exp(Q(s,a)/T)` (a
    :math:`\gamma`-contraction) until the sup-norm change of ``V`` is below
    ``tol * (1 - gamma)``, so ``V`` is within ``tol`` of the fixed point.
    """
    if not 0.0 <= gamma < 1.0 or temperature <= 0:
        raise ValueError(f"need 0 <= gamma < 1 and temperature > 0, got {gamma}, {temperature}")
    P, R = np.asarray(P, np.float64), np.asarray(R, np.float64)
    V = np.zeros(R.shape[0])
    for _ in range(max_iter):
        Q = R + gamma * P @ V
        V_new = _soft_max(Q, temperature)
        done = np.abs(V_new - V).max() <= tol * (1.0 - gamma)
        V = V_new
        if done:
            break
    else:
        raise RuntimeError(f"soft value iteration did not converge in {max_iter} iterations")
    Q = R + gamma * P @ V
    return Q, V, boltzmann_policy(Q, temperature)


def _policy_matrices(P: np.ndarray, R: np.ndarray, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.einsum("sa,sat->st", pi, P), (pi * R).sum(1)


def policy_evaluation(P: np.ndarray, R: np.ndarray, pi: np.ndarray, gamma: float,
                      mu0: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    r"""Exact evaluation of a stochastic policy ``pi`` ``(S, A)`` under reward ``R``.

    Returns ``(J, V, d)``: the expected discounted return :math:`J = \mu_0^\top V^\pi` (no
    entropy bonus), :math:`V^\pi = (I - \gamma P_\pi)^{-1} r_\pi` and the normalised
    discounted state occupancy :math:`d = (1-\gamma)\mu_0^\top(I - \gamma P_\pi)^{-1}`.
    """
    P_pi, r_pi = _policy_matrices(P, R, pi)
    M = np.eye(P.shape[0]) - gamma * P_pi
    V = np.linalg.solve(M, r_pi)
    d = (1.0 - gamma) * np.linalg.solve(M.T, mu0)
    return float(mu0 @ V), V, d


def state_visitation(P: np.ndarray, pi: np.ndarray, mu0: np.ndarray, horizon: int) -> np.ndarray:
    """Mean state distribution over steps ``0..horizon-1`` from ``mu0`` under ``pi``: the
    distribution of a uniformly drawn state of an ``horizon``-step episode."""
    P_pi, _ = _policy_matrices(P, np.zeros(pi.shape), pi)
    dist, total = np.asarray(mu0, np.float64), np.zeros(P.shape[0])
    for _ in range(horizon):
        total += dist
        dist = dist @ P_pi
    return total / horizon


def uniform_policy(S: int, A: int) -> np.ndarray:
    return np.full((S, A), 1.0 / A)


def tabular_policy(pi: np.ndarray) -> Callable[[Any, np.random.Generator], int]:
    """A ``policy(obs, rng)`` for :func:`~bicql_lightning.datasets.collect_dataset` that
    samples ``a ~ pi[obs]`` with the generator it is given (one uniform per step)."""
    cdf = np.cumsum(np.asarray(pi, np.float64), axis=1)

    def policy(obs: Any, rng: np.random.Generator) -> int:
        row = cdf[int(obs)]
        return int(min(np.searchsorted(row, rng.random() * row[-1], side="right"), row.shape[0] - 1))

    return policy
