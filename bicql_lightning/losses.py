r"""BiCQL-ML's loss terms as small pure functions of tensors.

Each returns ``(loss, metrics)`` or a tensor; none steps an optimizer or owns a network,
so each can be checked against hand-computed values and for where its gradients flow.
Equations follow the paper (arXiv 2511.22210) and ``shared/DESIGN.md``:

* soft value :math:`V(s) = T\log\sum_a \exp(Q(s,a)/T)` (Eq. soft-value),
* lower level (CQL): :math:`L_Q = \sum_i (Q_i(s,a)-y)^2 + \alpha\sum_i
  \mathbb E_{(s,a)\sim P}[V_i(s)-Q_i(s,a)]` with
  :math:`y = r_\theta(s,a) + \gamma(1-\text{terminated})\bar V(s')`,
* upper level (ML): :math:`L_R = (r_\theta(s,a) - A(s,a,s'))^2` with the soft advantage
  :math:`A = Q(s,a) - \gamma(1-\text{terminated})V(s')`,
* adaptive conservatism (CQL-Lagrange, an open question of the paper): the dual of
  :math:`\min_Q \max_{\alpha\ge0} \alpha(\mathbb E_P[V-Q] - \tau)`, stepped in
  :math:`\log\alpha` (:func:`cql_alpha_dual_loss`).

Metrics are returned as detached tensors; the module logs them without host syncs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Metrics = dict[str, Tensor]


def soft_value(q: Tensor, temperature: float) -> Tensor:
    r"""Exact soft maximum over a discrete action axis (the last one).

    :math:`V(s) = T \log \sum_a \exp(Q(s,a)/T)`; ``(..., A) -> (...)``.
    """
    return temperature * torch.logsumexp(q / temperature, dim=-1)


def sampled_soft_value(q: Tensor, log_proposal: Tensor, temperature: float) -> Tensor:
    r"""Importance-sampled soft maximum over continuous actions.

    With :math:`a_j \sim q(\cdot|s)`, :math:`j = 1..M`:
    :math:`V(s) \approx T\,(\operatorname{logsumexp}_j[Q(s,a_j)/T - \log q(a_j|s)] - \log M)`,
    unbiased for :math:`\exp(V/T)`. ``q``: ``(..., M)``; ``log_proposal``: broadcastable
    to it. Returns ``(...)``.
    """
    num_samples = q.shape[-1]
    return temperature * (
        torch.logsumexp(q / temperature - log_proposal, dim=-1) - math.log(num_samples)
    )


def sampled_soft_value_weights(q: Tensor, log_proposal: Tensor, temperature: float) -> Tensor:
    r""":math:`\partial V/\partial Q(s,a_j)` of :func:`sampled_soft_value`: the self-normalised
    importance weights :math:`w_j = \operatorname{softmax}_j(Q(s,a_j)/T - \log q(a_j|s))`,
    ``(..., M)``, summing to 1 over the last axis."""
    return torch.softmax(q / temperature - log_proposal, dim=-1)


def value_surrogate(value: Tensor, q_picked: Tensor, coefficients: Tensor) -> Tensor:
    r"""A soft value whose gradient is estimated from a few of its actions.

    Returns :math:`V + \sum_l c_l (Q_l - \operatorname{sg}[Q_l])`: numerically ``value``
    (taken as a constant), with gradient :math:`\sum_l c_l \nabla Q_l`. With the picks and
    coefficients of an importance-sampled draw from :math:`w` (``BiCQLML``'s
    ``cql_gradient_samples``) that is an unbiased estimate of
    :math:`\nabla V = \sum_j w_j \nabla Q_j`, at the cost of backpropagating through the
    picked actions only. ``value``: ``(...)``; ``q_picked``, ``coefficients``: ``(..., k)``.
    """
    return value.detach() + (coefficients.detach() * (q_picked - q_picked.detach())).sum(-1)


def td_target(reward: Tensor, next_value: Tensor, terminated: Tensor, gamma: float) -> Tensor:
    r"""Soft Bellman target :math:`y = r + \gamma(1-\text{terminated})\bar V(s')`.

    Only termination stops bootstrapping: a time-limit truncation is not the end of the
    task, so its transitions bootstrap like any other. All ``(B,)``.
    """
    return reward + gamma * (1.0 - terminated.to(reward.dtype)) * next_value


def soft_advantage(q_data: Tensor, next_value: Tensor, terminated: Tensor, gamma: float) -> Tensor:
    r"""The reward's regression target :math:`A = Q(s,a) - \gamma(1-\text{terminated})V(s')`.

    At the upper level's fixed point :math:`r_\theta = A` on expert pairs, i.e. :math:`Q` is
    the soft-optimal Q of :math:`r_\theta` there. All ``(B,)``.
    """
    return q_data - gamma * (1.0 - terminated.to(q_data.dtype)) * next_value


def terminal_zero_target(target: Tensor, terminated: Tensor) -> Tensor:
    r"""``target`` with terminal pairs' entries set to 0: where an episode ends, the soft
    advantage is :math:`Q(s,a)`, whose own TD target is :math:`r_\theta(s,a)`, so nothing
    but this pins the step into the absorbing state (value 0). All ``(B,)``."""
    return torch.where(terminated.bool(), torch.zeros_like(target), target)


def level_anchored_target(advantage: Tensor, reward: Tensor, gap: Tensor | None = None) -> Tensor:
    r"""The soft advantage moved to the reward's current level: :math:`A - \mathbb E_B[A - r_\theta]`.

    The expert's likelihood cannot see a constant added to every step's reward (the
    loop's neutral direction :math:`(Q + c, r + (1-\gamma)c)`), so regressing onto
    :math:`A` itself lets anything that biases :math:`A` against :math:`r_\theta` on
    average, such as the target network's lag behind a rising Q, drag the reward's level
    along that direction until its bound stops it. Regressed onto this target, the
    reward learns :math:`A` up to a constant: a uniform shift of :math:`r_\theta` has zero
    gradient. ``gap``: :math:`\mathbb E_B[A - r_\theta]` over the global batch where the
    batch is split over processes (default: this batch's). All ``(B,)``; no gradient is
    taken through the result.
    """
    if gap is None:
        gap = (advantage - reward).mean()
    return (advantage - gap).detach()


def level_pinned_target(advantage: Tensor, offline_advantage_mean: Tensor, level: float | Tensor) -> Tensor:
    r"""The soft advantage moved so that its mean over D's pairs is ``level``: :math:`A - \mathbb E_D[A] + \ell`.

    Like :func:`level_anchored_target`, the reward learns :math:`A` up to a constant,
    but the constant is set by the data rather than by where the network starts: the
    reward's mean over the offline pairs is held at :math:`\ell`, and the expert's pairs
    sit above or below it by their advantage over D's. ``offline_advantage_mean``:
    :math:`\mathbb E_D[A]` over the (global) offline batch. All ``(B,)``; no gradient is
    taken through the result.
    """
    return (advantage - offline_advantage_mean + level).detach()


def q_loss(q_data: Tensor, target: Tensor) -> tuple[Tensor, Metrics]:
    r"""TD regression :math:`\sum_i \mathbb E_B[(Q_i(s,a) - y)^2]`.

    ``q_data``: ``(E, B)`` the ensemble's values at data pairs; ``target``: ``(B,)`` (no
    gradient is taken through it).
    """
    error = q_data - target.detach().unsqueeze(0)  # (E, B)
    loss = error.pow(2).mean(dim=1).sum()
    return loss, {"q/td_loss": loss.detach(), "q/data": q_data.detach().mean(),
                  "q/target": target.detach().mean()}


def cql_penalty(value: Tensor, q_data: Tensor, alpha: float | Tensor) -> tuple[Tensor, Metrics]:
    r"""Conservative term :math:`\alpha\sum_i \mathbb E_{(s,a)\sim P}[V_i(s) - Q_i(s,a)]`.

    ``value`` and ``q_data`` are ``(E, B)`` at the same states ``s``: with ``T`` as the
    temperature, :math:`(V_i(s) - Q_i(s,a))/T` is the negative log-likelihood of ``a``
    under the Boltzmann policy of :math:`Q_i`, so on expert pairs the term is the
    maximum-likelihood objective. Its gradient pushes Q down where the policy puts mass
    and up at the data's actions. ``alpha`` is a number or, with adaptive conservatism, a
    scalar tensor (no gradient is taken through it).
    """
    if isinstance(alpha, Tensor):
        alpha = alpha.detach()
    gap = (value - q_data).mean(dim=1)  # (E,)
    loss = alpha * gap.sum()
    return loss, {"cql/loss": loss.detach(), "cql/gap": gap.detach().mean()}


def cql_alpha_dual_loss(log_alpha: Tensor, gap: Tensor, target_gap: float) -> tuple[Tensor, Metrics]:
    r"""Dual objective of the CQL-Lagrange constraint :math:`\mathbb E_P[V(s) - Q(s,a)] \le \tau`.

    The Lagrangian of the lower level is :math:`\min_Q\max_{\alpha\ge0} L_{TD} +
    \alpha(\text{gap} - \tau)` (CQL, Kumar et al. 2020, Eq. 30 with the gap of
    ``cql_penalty``). Minimising :math:`\log\alpha\,(\tau - \text{gap})` moves
    :math:`\log\alpha` along the dual's ascent direction :math:`\text{gap}-\tau` with
    the factor :math:`\alpha` dropped (as SAC's temperature loss does), so a step does not
    vanish as :math:`\alpha\to0`; the fixed point, gap = τ, is the same. ``log_alpha``: a
    scalar that requires grad; ``gap``: the scalar gap (no gradient is taken through it).
    """
    loss = log_alpha * (target_gap - gap.detach())
    return loss, {"cql/alpha": log_alpha.detach().exp(), "cql/gap_minus_target": gap.detach() - target_gap}


def reward_loss(reward: Tensor, target: Tensor) -> tuple[Tensor, Metrics]:
    r"""Upper-level regression :math:`\mathbb E_B[(r_\theta(s,a) - A)^2]`, target frozen."""
    loss = (reward - target.detach()).pow(2).mean()
    return loss, {"reward/loss": loss.detach(), "reward/mean": reward.detach().mean(),
                  "reward/std": reward.detach().std(unbiased=False),
                  "reward/target_mean": target.detach().mean()}


def expert_nll(value: Tensor, q_data: Tensor, temperature: float) -> Tensor:
    r"""Mean negative log-likelihood :math:`\mathbb E[(V(s) - Q(s,a))/T]` of data actions
    under the Boltzmann policy; ``(B,)`` inputs. A validation measure, not a loss."""
    return ((value - q_data) / temperature).mean()

