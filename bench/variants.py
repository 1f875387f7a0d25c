r"""Experimental variants of BiCQL-ML: the paper's open questions, for ``bench.tabular``.

None of these is in a shipped config, so they are not options of the library's module;
:class:`BiCQLMLVariant` adds them through the module's hooks (``cql_alpha``,
``after_q_update``, ``after_q_updates``, ``after_reward_update``, ``reward_target``).

* ``cql_target_gap``: adaptive conservatism (CQL-Lagrange). ``None`` keeps :math:`\alpha`
  fixed; a number :math:`\tau` tunes :math:`\alpha` by dual steps on :math:`\log\alpha`
  after each step's Q updates (:func:`~bicql_lightning.losses.cql_alpha_dual_loss`),
  raising it while the CQL gap :math:`\mathbb E_P[V - Q]` exceeds :math:`\tau`. ``alpha``
  is the starting value; :math:`\alpha` stays in ``[1e-3, 1e3]``, is saved in checkpoints
  (buffer ``log_alpha``) and logged as ``cql/alpha``. ``cql_alpha_lr``: the dual step size.
* ``spectral_norm`` / ``reward_spectral_norm``: after every Q (reward) update, project each
  hidden layer onto spectral norm :math:`\le 1`, per twin: one way to approach the
  contraction condition :math:`L_Q L_{ML} < 1` of the paper's theorem (the head stays free).
* ``reward_target="q"``: regress the reward onto :math:`Q(s,a)` itself, no soft value (an
  ablation; its fixed point is the soft-optimal Q only when :math:`\gamma = 0`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from bicql_lightning import BiCQLML, losses
from bicql_lightning.distributed import all_reduce_mean_, is_distributed
from bicql_lightning.networks import clip_spectral_norm_, mlp_hidden_weight_groups

# A target gap the data cannot reach would otherwise drive log alpha without bound.
LOG_ALPHA_MIN, LOG_ALPHA_MAX = float(np.log(1e-3)), float(np.log(1e3))


class BiCQLMLVariant(BiCQLML):
    """:class:`~bicql_lightning.BiCQLML` with the experimental options of this file's docstring."""

    model_name = "BiCQLMLVariant"

    def __init__(self, cql_target_gap: float | None = None, cql_alpha_lr: float = 1e-3,
                 spectral_norm: bool = False, reward_spectral_norm: bool = False,
                 reward_target: Literal["soft_advantage", "q"] = "soft_advantage", **kwargs: Any):
        if reward_target not in ("soft_advantage", "q"):
            raise ValueError(f"reward_target must be 'soft_advantage' or 'q', got {reward_target!r}")
        if cql_target_gap is not None and kwargs.get("alpha", 1.0) <= 0:
            raise ValueError("adaptive conservatism (cql_target_gap) needs a positive starting alpha, got "
                             f"{kwargs.get('alpha')}")
        super().__init__(**kwargs)
        if cql_target_gap is not None:
            # A buffer: saved in checkpoints, moved with the module, identical under DDP.
            self.register_buffer("log_alpha", torch.tensor(float(np.log(self.hparams.alpha))))

    def cql_alpha(self) -> float | Tensor:
        return self.hparams.alpha if self.hparams.cql_target_gap is None else self.log_alpha.exp()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._clip(q=True, reward=True)  # start inside the constraint set (idempotent on resume)

    def after_q_update(self) -> None:
        self._clip(q=True, reward=False)

    def after_reward_update(self) -> None:
        self._clip(q=False, reward=True)

    def after_q_updates(self, q_metrics: losses.Metrics) -> losses.Metrics:
        if self.hparams.cql_target_gap is None:
            return {}
        # The gap of the last Q update's objective, averaged over ranks, taken with the alpha it used.
        world_size, _ = self._world()
        gap = q_metrics["cql/gap"].detach().float().reshape(()).clone()
        if is_distributed(world_size):
            all_reduce_mean_([gap], world_size)
        with torch.enable_grad():
            log_alpha = self.log_alpha.detach().clone().requires_grad_(True)
            loss, metrics = losses.cql_alpha_dual_loss(log_alpha, gap, self.hparams.cql_target_gap)
            (grad,) = torch.autograd.grad(loss, log_alpha)
        with torch.no_grad():
            self.log_alpha.sub_(self.hparams.cql_alpha_lr * grad).clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        return metrics

    def reward_target(self, q_data: Tensor, next_value: Tensor, pairs) -> Tensor:
        if self.hparams.reward_target == "q":
            return q_data
        return super().reward_target(q_data, next_value, pairs)

    def _clip(self, q: bool, reward: bool) -> None:
        if q and self.hparams.spectral_norm:
            for net in (self.q_net, self.target_q_net):
                clip_spectral_norm_(net.hidden_weight_groups(), in_dim=-2)
        if reward and self.hparams.reward_spectral_norm:
            clip_spectral_norm_(mlp_hidden_weight_groups(self.reward_net.net), in_dim=-1)
