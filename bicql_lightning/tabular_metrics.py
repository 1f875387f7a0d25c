r"""Exact evaluation of learned rewards and policies on the tabular MDPs of
:mod:`bicql_lightning.tabular`.

:class:`TabularTask` holds an MDP with its expert (the soft-optimal Boltzmann policy
``pi*`` at temperature ``T`` and discount ``gamma``) and scores a learned reward table
and a learned policy:

* ``return_ratio`` :math:`(J(\pi_\theta) - J(\pi_{rand})) / (J(\pi^*) - J(\pi_{rand}))`,
  true reward, exact, where :math:`\pi_\theta` is the soft-optimal policy of the learned
  reward (same ``T`` and ``gamma``);
* ``nll_gap`` expert-action negative log-likelihood under the learned policy minus under
  ``pi*``, in expectation over fresh expert states and actions: exactly
  :math:`\sum_s d_E(s)\,\mathrm{KL}(\pi^*(\cdot|s)\,\|\,\pi(\cdot|s))` (no sampling noise);
* ``reward_dist`` (:func:`shaping_distance` weighted by the expert's state-action
  visitation), ``reward_dist_all`` (the same with the expert's state visitation times
  uniform actions) and ``epic`` (:func:`epic_distance`, deterministic dynamics only).

``d_E`` is the expert's state visitation over an episode of the time limit ``horizon``
(:func:`~bicql_lightning.tabular.state_visitation`): the distribution the demonstrations'
states are drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback

from .tabular import TabularEnv, boltzmann_policy, policy_evaluation, soft_value_iteration, state_visitation

__all__ = ["TabularMetrics", "TabularTask", "count_bc_policy", "epic_distance", "model_tables",
           "nll_gap", "shaping_distance", "shaping_fit"]


def shaping_fit(r_true: np.ndarray, r: np.ndarray, P: np.ndarray, gamma: float, weights: np.ndarray,
                fit_scale: bool = True) -> dict[str, Any]:
    r"""The least-squares fit behind :func:`shaping_distance`.

    Returns ``distance``, the scale ``c``, constant ``b``, potential ``f`` ``(S,)`` and
    ``fitted`` :math:`= c\,r + b + f(s) - \gamma\,\mathbb E f(s')` ``(S, A)``: ``r`` moved
    as close to ``r_true`` as its equivalence class allows (what a plot should show).
    """
    S, A = r_true.shape
    w = np.asarray(weights, np.float64).reshape(-1)
    shaping = (np.eye(S)[:, None, :] - gamma * P).reshape(S * A, S)  # f(s) - gamma E f(s')
    base = np.concatenate([np.ones((S * A, 1)), shaping], axis=1)
    target = r_true.reshape(-1).astype(np.float64)
    rr = np.asarray(r, np.float64).reshape(-1)
    root = np.sqrt(w)

    def solve(design: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.linalg.lstsq(design * root[:, None], y * root, rcond=None)[0]

    c = 1.0
    if fit_scale:
        x = solve(np.concatenate([rr[:, None], base], axis=1), target)
        c, x = (x[0], x[1:]) if x[0] >= 0 else (0.0, solve(base, target))
    else:
        x = solve(base, target - rr)
    fitted = c * rr + base @ x
    res = target - fitted
    mean = (w * target).sum() / w.sum()
    distance = float(np.sqrt((w * res**2).sum() / (w * (target - mean) ** 2).sum()))
    return {"distance": distance, "c": float(c), "b": float(x[0]), "f": x[1:], "fitted": fitted.reshape(S, A)}


def shaping_distance(r_true: np.ndarray, r: np.ndarray, P: np.ndarray, gamma: float, weights: np.ndarray,
                     fit_scale: bool = True) -> float:
    r"""Shaping-invariant distance of a reward table ``r`` ``(S, A)`` from ``r_true``.

    Fits :math:`r_{true}(s,a) \approx c\,r(s,a) + b + f(s) - \gamma\sum_{s'}P(s'|s,a)f(s')`
    by weighted least squares over ``c >= 0`` (``c = 1`` if not ``fit_scale``), a constant
    ``b`` and a potential ``f`` (S numbers), with weights ``weights`` ``(S, A)``, and returns
    :math:`\|res\|_w / \|r_{true} - \bar r_{true}\|_w` (:math:`\bar r` the weighted mean).
    0: ``r`` is a positive multiple of ``r_true`` up to potential shaping and a constant;
    a reward that explains nothing scores what shaping alone leaves of ``r_true`` (at
    most 1). A negative best ``c`` is refitted with ``c = 0``. See :func:`shaping_fit`.
    """
    return shaping_fit(r_true, r, P, gamma, weights, fit_scale)["distance"]


def epic_distance(R1: np.ndarray, R2: np.ndarray, gamma: float, state_dist: np.ndarray,
                  coverage: np.ndarray) -> float:
    r"""EPIC pseudometric (Gleave et al. 2021) between two rewards.

    ``R1``, ``R2``: transition rewards ``(S, A, S)``, or ``(S, A)`` tables lifted to
    :math:`R(s,a,s') = r(s,a)`. Canonicalisation with :math:`S, S' \sim` ``state_dist`` and
    :math:`A` uniform:
    :math:`C(R)(s,a,s') = R(s,a,s') + \mathbb E[\gamma R(s',A,S') - R(s,A,S') - \gamma R(S,A,S')]`,
    then the Pearson distance :math:`\sqrt{(1-\rho)/2}` under ``coverage`` ``(S, A, S)``
    (e.g. :math:`d_E(s)\,\frac1A\,P(s'|s,a)`). ``nan`` if a canonical reward is constant
    (a constant reward has no correlation). It is invariant to potential shaping
    :math:`\gamma\Phi(s') - \Phi(s)` of the *transition* reward, positive scaling and
    constants; a shaping that an ``(s, a)`` table absorbs through the dynamics,
    :math:`\gamma\mathbb E\Phi(s') - \Phi(s)`, is not removed by the lift (only on
    deterministic dynamics and covered transitions are the two the same, and EPIC's
    canonicalisation also reads off-dynamics triples): see :func:`shaping_distance`.
    """
    D_S = np.asarray(state_dist, np.float64)
    D_S = D_S / D_S.sum()

    def canon(R: np.ndarray) -> np.ndarray:
        R = np.asarray(R, np.float64)
        S, A = R.shape[:2]
        if R.ndim == 2:
            R = np.broadcast_to(R[:, :, None], (S, A, S))
        m = (R.mean(1) * D_S[None, :]).sum(1)  # m(x) = E_{A, S'} R(x, A, S')
        return R + gamma * m[None, None, :] - m[:, None, None] - gamma * (D_S @ m)

    w = np.asarray(coverage, np.float64).reshape(-1)
    w = w / w.sum()
    x, y = canon(R1).reshape(-1), canon(R2).reshape(-1)
    x, y = x - w @ x, y - w @ y
    vx, vy = w @ x**2, w @ y**2
    if vx < 1e-20 or vy < 1e-20:
        return float("nan")
    rho = float(np.clip((w @ (x * y)) / np.sqrt(vx * vy), -1.0, 1.0))
    return float(np.sqrt((1.0 - rho) / 2.0))


def nll_gap(pi_star: np.ndarray, pi: np.ndarray, state_dist: np.ndarray, floor: float = 1e-12) -> float:
    """Expected expert-action NLL under ``pi`` minus under ``pi_star`` on states from
    ``state_dist``: the ``state_dist``-weighted KL(pi* || pi), in nats."""
    kl = (pi_star * (np.log(np.maximum(pi_star, floor)) - np.log(np.maximum(pi, floor)))).sum(1)
    return float(state_dist @ kl)


def count_bc_policy(obs: np.ndarray, actions: np.ndarray, S: int, A: int, prior: float = 0.5) -> np.ndarray:
    """Behaviour cloning by counts: ``(n(s, a) + prior) / (n(s) + A * prior)``; uniform on unseen states."""
    counts = np.zeros((S, A))
    np.add.at(counts, (np.asarray(obs, np.int64), np.asarray(actions, np.int64)), 1.0)
    return (counts + prior) / (counts.sum(1, keepdims=True) + A * prior)


@torch.no_grad()
def model_tables(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(reward_table, q_table)`` of a Discrete-observation ``BiCQLML``, each ``(S, A)``:
    ``reward_net.reward_table`` on every state and the twins' minimum Q."""
    states = torch.arange(model.spaces["obs_dim"], device=model.device)
    reward = model.reward_net.reward_table(states)
    q = model.q_net(model.encoder(states)).min(0).values
    return reward.double().cpu().numpy(), q.double().cpu().numpy()


@dataclass
class TabularTask:
    """An MDP, its soft-optimal expert and the reference numbers the metrics need."""

    P: np.ndarray
    R: np.ndarray
    mu0: np.ndarray
    gamma: float
    temperature: float
    horizon: int
    deterministic: bool = False
    Q_star: np.ndarray = field(init=False)
    V_star: np.ndarray = field(init=False)
    pi_star: np.ndarray = field(init=False)
    d_E: np.ndarray = field(init=False)
    J_star: float = field(init=False)
    J_rand: float = field(init=False)

    def __post_init__(self) -> None:
        self.Q_star, self.V_star, self.pi_star = soft_value_iteration(self.P, self.R, self.gamma, self.temperature)
        self.d_E = state_visitation(self.P, self.pi_star, self.mu0, self.horizon)
        self.J_star = self.J(self.pi_star)
        self.J_rand = self.J(np.full(self.R.shape, 1.0 / self.R.shape[1]))

    @classmethod
    def from_env(cls, env: Any, gamma: float, temperature: float, horizon: int | None = None) -> TabularTask:
        base: TabularEnv = env.unwrapped
        if horizon is None:
            horizon = getattr(getattr(env, "spec", None), "max_episode_steps", None) or 50
        deterministic = bool(np.all((base.P == 0) | (base.P == 1)))
        return cls(base.P, base.R, base.mu0, gamma, temperature, int(horizon), deterministic)

    @property
    def weights(self) -> np.ndarray:
        r"""``(S, A)`` weights of ``reward_dist``: the expert's state-action visitation
        :math:`d_E(s)\,\pi^*(a|s)` (where demonstrations put their pairs)."""
        return self.d_E[:, None] * self.pi_star

    @property
    def weights_all(self) -> np.ndarray:
        """``(S, A)`` weights of ``reward_dist_all`` and of EPIC's coverage: the expert's
        state visitation times uniform actions, so actions the expert rarely takes count
        as much as its favourite ones (stricter: their rewards rest on few samples)."""
        return np.repeat(self.d_E[:, None] / self.R.shape[1], self.R.shape[1], axis=1)

    def J(self, pi: np.ndarray) -> float:
        return policy_evaluation(self.P, self.R, pi, self.gamma, self.mu0)[0]

    def return_ratio_of_policy(self, pi: np.ndarray) -> float:
        return (self.J(pi) - self.J_rand) / (self.J_star - self.J_rand)

    def soft_optimal_policy(self, reward: np.ndarray) -> np.ndarray:
        return soft_value_iteration(self.P, reward, self.gamma, self.temperature)[2]

    def reward_metrics(self, reward: np.ndarray) -> dict[str, float]:
        """``return_ratio`` (of the reward's soft-optimal policy), ``reward_dist`` (weights
        :attr:`weights`), ``reward_dist_all`` (:attr:`weights_all`) and, on deterministic
        dynamics, ``epic``."""
        out = {"return_ratio": self.return_ratio_of_policy(self.soft_optimal_policy(reward)),
               "reward_dist": shaping_distance(self.R, reward, self.P, self.gamma, self.weights),
               "reward_dist_all": shaping_distance(self.R, reward, self.P, self.gamma, self.weights_all)}
        if self.deterministic:
            coverage = self.weights_all[:, :, None] * self.P
            out["epic"] = epic_distance(self.R, reward, self.gamma, self.d_E, coverage)
        return out

    def policy_metrics(self, pi: np.ndarray) -> dict[str, float]:
        return {"nll_gap": nll_gap(self.pi_star, pi, self.d_E),
                "policy_return_ratio": self.return_ratio_of_policy(pi)}

    def evaluate_model(self, model: Any) -> dict[str, float]:
        """All metrics of a trained ``BiCQLML``: its reward table and its Boltzmann(Q) policy."""
        reward, q = model_tables(model)
        out = self.reward_metrics(reward)
        out.update(self.policy_metrics(boltzmann_policy(q, self.temperature)))
        return out


class TabularMetrics(Callback):
    """Records :meth:`TabularTask.evaluate_model` every ``every_n_updates`` training updates
    (and at the end of fit) in ``history``: a list of dicts with an ``updates`` key."""

    def __init__(self, task: TabularTask, every_n_updates: int = 250):
        self.task, self.every = task, every_n_updates
        self.history: list[dict[str, float]] = []

    def _record(self, pl_module: Any) -> None:
        if self.history and self.history[-1]["updates"] == pl_module.updates:
            return
        self.history.append({"updates": pl_module.updates, **self.task.evaluate_model(pl_module)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.updates % self.every == 0:
            self._record(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(pl_module)
