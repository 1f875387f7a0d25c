r"""Behaviour cloning (BC) as a LightningModule: the benchmark's non-IRL baseline.

Maximum likelihood of the data's actions under a policy network, on the expert batch
(``train_on="expert"``, the usual BC) or on the offline batch (``train_on="offline"``,
"BC on all of D"). Same data module, observation encoder and network widths as
:class:`~bicql_lightning.BiCQLML`.

* Discrete actions: a categorical policy :math:`\pi(a|s) = \mathrm{softmax}(f(s))_a`,
  loss the cross-entropy :math:`-\mathbb E[\log\pi(a|s)]`.
* Box actions: a Gaussian policy with state-dependent mean and log-std in the action
  box's unit coordinates :math:`\bar a = (a - c)/h \in [-1, 1]^A` (``c``, ``h`` the box's
  centre and half-width), made bounded in one of two ways (``distribution``):

  - ``"clipped"`` (default): :math:`\bar a = \mathrm{clip}(u, -1, 1)`,
    :math:`u\sim\mathcal N(\mu(s), \sigma(s)^2)`, per dimension. This is exactly how the
    benchmark's experts act (``clip(mean + noise·std·ε, low, high)``), and its likelihood
    is exact: inside the box the Gaussian density (in environment units, i.e. divided by
    ``h``), on a face the probability mass the Gaussian puts beyond it,
    :math:`\Phi((\mu - 1)/\sigma)` or :math:`\Phi((-1 - \mu)/\sigma)` (a *censored*
    Gaussian). Saturated actions, common in clipped noisy demonstrations, then carry a
    finite, well-behaved likelihood. Greedy action: :math:`\mathrm{clip}(\mu, -1, 1)`.
  - ``"tanh"``: :math:`\bar a = \tanh(u)`, the SAC parametrisation (what IQ-Learn's
    actor uses). Its density diverges on the box's faces, so actions there are moved
    ``1e-6`` inside (as :class:`~bicql_lightning.ActionProposal` does) and dominate the
    likelihood of saturated data. Greedy action: :math:`\tanh(\mu)`.

The Gaussian and its likelihoods live in :mod:`bicql_lightning.densities`; the machinery
every module shares (updates, DDP, the random stream, checkpoints) in ``base.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .base import OfflineModule, check_common_hparams
from .densities import GaussianPolicy
from .distributed import full_precision
from .losses import Metrics
from .networks import mlp
from .spaces import SpaceSpec, check_spec

Batch = dict[str, Tensor]
def categorical_bc_loss(logits: Tensor, action: Tensor) -> tuple[Tensor, Metrics]:
    r"""Cross-entropy :math:`-\mathbb E_B[\log\mathrm{softmax}(f(s))_a]` of a categorical policy.

    ``logits``: ``(B, A)``; ``action``: ``(B,)`` integer actions. Metrics: ``bc/nll`` (the
    loss), ``bc/accuracy`` (argmax agreement), ``bc/entropy`` (mean policy entropy, nats).
    """
    log_pi = torch.log_softmax(logits, dim=-1)
    nll = -log_pi.gather(1, action.long().reshape(-1, 1)).squeeze(1)
    loss = nll.mean()
    with torch.no_grad():
        accuracy = (logits.argmax(1) == action.long().reshape(-1)).float().mean()
        entropy = -(log_pi.exp() * log_pi).sum(1).mean()
    return loss, {"bc/nll": loss.detach(), "bc/accuracy": accuracy, "bc/entropy": entropy}


# ============================================================================ shared module machinery
@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` take no gradient inside the block; flags restored after."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


# ============================================================================ the module
class BehaviorCloning(OfflineModule):
    """Behaviour cloning: maximum likelihood of demonstrated actions.

    Args:
        spaces: observation/action spaces as a :class:`SpaceSpec` dict. Left ``None``,
            it is taken from the data module at ``setup`` (the CLI links it).
        hidden_sizes: hidden widths of the policy network (BiCQLML's Q networks' default).
        train_on: the batch whose actions are cloned: ``"expert"`` (D_E, the usual BC) or
            ``"offline"`` (D, "BC on all the data").
        distribution: Box actions only: ``"clipped"`` (a Gaussian clipped to the box, exact
            censored likelihood; the default) or ``"tanh"`` (tanh-squashed Gaussian). See
            the module docstring.
        log_std_min: lower bound of the Box policy's log-std.
        log_std_max: upper bound of the Box policy's log-std.
        lr: Adam learning rate.
        weight_decay: Adam (L2) weight decay.
        updates_per_sec_every: updates between two throughput measurements.
        log_every_n_updates: training metrics are logged every N updates; ``None`` follows
            the Trainer's ``log_every_n_steps``.
        sample_seed: seed of the module's random stream (used by stochastic acting only:
            training draws nothing); ``None`` takes the run's seed (``PL_GLOBAL_SEED``) or 0.

    Logged: ``bc/nll``, ``bc/accuracy`` and ``bc/entropy`` (Discrete), ``bc/log_std``,
    ``bc/mse`` and ``bc/at_bound`` (Box), ``train/updates_per_sec``, ``train/updates``;
    validation: ``val/expert_nll``, ``val/expert_action_accuracy`` (Discrete),
    ``val/expert_action_mse`` (Box, unit-box coordinates).

    No target network: a configured :class:`~bicql_lightning.TargetNetworkUpdate` has
    nothing to do and is skipped, so BiCQL-ML's configs can be reused with
    ``--model bicql_lightning.BehaviorCloning``.
    """

    model_name = "BehaviorCloning"

    def __init__(
        self,
        spaces: dict[str, Any] | None = None,
        hidden_sizes: list[int] = [256, 256],  # noqa: B006 - jsonargparse needs a literal
        train_on: Literal["expert", "offline"] = "expert",
        distribution: Literal["clipped", "tanh"] = "clipped",
        log_std_min: float = -5.0,
        log_std_max: float = 2.0,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        updates_per_sec_every: int = 100,
        log_every_n_updates: int | None = None,
        sample_seed: int | None = None,
    ):
        super().__init__()
        if train_on not in ("expert", "offline"):
            raise ValueError(f"train_on must be 'expert' or 'offline', got {train_on!r}")
        if distribution not in ("clipped", "tanh"):
            raise ValueError(f"distribution must be 'clipped' or 'tanh', got {distribution!r}")
        if not log_std_min < log_std_max:
            raise ValueError(f"log_std_min must be below log_std_max, got {log_std_min} and {log_std_max}")
        check_common_hparams(hidden_sizes=hidden_sizes, log_every_n_updates=log_every_n_updates)
        self.save_hyperparameters()
        self._init_state()
        if spaces is not None:
            self._build(check_spec(dict(spaces)))

    def _build(self, spaces: SpaceSpec) -> None:
        hp = self.hparams
        self._adopt_spaces(spaces)
        if self.discrete:
            self.policy: nn.Module = mlp(spaces["obs_dim"], hp.hidden_sizes, spaces["action_dim"])
        else:
            self.policy = GaussianPolicy(spaces, hp.hidden_sizes, hp.distribution,
                                         (hp.log_std_min, hp.log_std_max))
        self.built = True

    def configure_optimizers(self):
        return torch.optim.Adam(self.policy.parameters(), lr=self.hparams.lr,
                                weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ objective
    def bc_objective(self, batch: Batch) -> tuple[Tensor, Metrics]:
        """Negative log-likelihood of ``batch``'s actions (cross-entropy for Discrete)."""
        obs = self.encoder(batch["obs"])
        if self.discrete:
            return categorical_bc_loss(full_precision(self.policy(obs)), batch["action"])
        return self.policy.loss(obs, batch["action"])

    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> None:
        (opt,) = self._optimizer_list()
        metrics = self._step(opt, self.bc_objective, batch[self.hparams.train_on])
        self._finish_step(metrics)

    def validation_step(self, batch: dict[str, Batch], batch_idx: int) -> None:
        expert = batch["expert"]
        loss, metrics = self.bc_objective(expert)
        # Every rank scores the same validation batch: sync_dist averages equal numbers.
        self.log("val/expert_nll", loss, prog_bar=True, sync_dist=True)
        if self.discrete:
            self.log("val/expert_action_accuracy", metrics["bc/accuracy"], sync_dist=True)
        else:
            self.log("val/expert_action_mse", metrics["bc/mse"], sync_dist=True)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor, deterministic: bool = True) -> np.ndarray:
        """Action(s) for raw observation(s): the argmax / greedy action (``deterministic``,
        the Gaussian's mean clipped or squashed into the box), else a draw from the policy."""
        obs_t, single = self._obs_tensor(obs)
        enc = self.encoder(obs_t)
        if self.discrete:
            logits = self.policy(enc)
            action = logits.argmax(1) if deterministic else torch.distributions.Categorical(logits=logits).sample()
        else:
            action = self.policy.mode(enc) if deterministic else self.policy.sample(enc)
        out = action.cpu().numpy()
        return out[0] if single else out
