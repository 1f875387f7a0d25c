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

This module also holds the machinery the baselines share with BiCQLML's pattern
(``OfflineModule`` in base.py): manual optimisation with per-optimizer toggling and explicit DDP
gradient averaging, the ``updates`` counter, throughput, the module's random stream,
the observation encoder's statistics from the data module, and checkpoint markers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .base import OfflineModule
from .losses import Metrics
from .distributed import full_precision
from .networks import mlp
from .spaces import SpaceSpec, check_spec

Batch = dict[str, Tensor]

# Unit-box coordinates within this distance of ±1 count as on the box's face.
BOUNDARY_EDGE = 1e-6
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ============================================================================ losses
def gaussian_log_prob(mean: Tensor, log_std: Tensor, x: Tensor) -> Tensor:
    r"""Elementwise normal log density :math:`-\tfrac12 z^2 - \log\sigma - \tfrac12\log 2\pi`,
    :math:`z = (x - \mu)/\sigma`."""
    z = (x - mean) / log_std.exp()
    return -0.5 * z.pow(2) - log_std - LOG_SQRT_2PI


def clipped_gaussian_log_prob(mean: Tensor, log_std: Tensor, unit_action: Tensor,
                              edge: float = BOUNDARY_EDGE) -> Tensor:
    r"""Elementwise log-likelihood of :math:`\bar a = \mathrm{clip}(u, -1, 1)`,
    :math:`u\sim\mathcal N(\mu, \sigma^2)` (a censored Gaussian), in unit coordinates.

    Inside the box it is the normal log density at :math:`\bar a`; at :math:`\bar a \ge
    1 - \text{edge}` it is :math:`\log\Phi((\mu - 1)/\sigma)` (the mass clipped onto the
    upper face) and at :math:`\bar a \le -1 + \text{edge}` it is
    :math:`\log\Phi((-1 - \mu)/\sigma)`. A likelihood with respect to Lebesgue measure
    plus an atom on each face: the measure does not depend on the parameters, so its
    maximiser is the maximum-likelihood estimate.
    """
    std = log_std.exp()
    upper = torch.special.log_ndtr((mean - 1.0) / std)
    lower = torch.special.log_ndtr((-1.0 - mean) / std)
    inside = gaussian_log_prob(mean, log_std, unit_action)
    return torch.where(unit_action >= 1.0 - edge, upper, torch.where(unit_action <= -1.0 + edge, lower, inside))


def tanh_gaussian_log_prob(mean: Tensor, log_std: Tensor, unit_action: Tensor,
                           edge: float = BOUNDARY_EDGE) -> Tensor:
    r"""Elementwise log density of :math:`\bar a = \tanh(u)`, :math:`u\sim\mathcal N(\mu,
    \sigma^2)`: :math:`\log\mathcal N(\operatorname{atanh}\bar a) - \log(1 - \bar a^2)`.
    Actions on the faces are moved ``edge`` inside (the density diverges there)."""
    unit = unit_action.clamp(-1.0 + edge, 1.0 - edge)
    return gaussian_log_prob(mean, log_std, torch.atanh(unit)) - torch.log1p(-unit.pow(2))


def tanh_log_jacobian(u: Tensor) -> Tensor:
    r""":math:`\log(1 - \tanh(u)^2) = 2(\log 2 - u - \mathrm{softplus}(-2u))`, stable for large :math:`|u|`."""
    return 2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))


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


def gaussian_bc_loss(mean: Tensor, log_std: Tensor, unit_action: Tensor, log_half_width: Tensor,
                     distribution: Literal["clipped", "tanh"] = "clipped",
                     edge: float = BOUNDARY_EDGE) -> tuple[Tensor, Metrics]:
    r"""Negative log-likelihood :math:`-\mathbb E_B[\log\pi(a|s)]` of a bounded Gaussian
    policy, in the environment's action units.

    ``mean``, ``log_std``, ``unit_action``: ``(B, A)`` in unit-box coordinates;
    ``log_half_width``: ``(A,)``, :math:`\log h`. Densities convert to environment units
    by :math:`-\log h` per dimension, except on the faces of a ``"clipped"`` policy, where
    the likelihood is a probability (see :func:`clipped_gaussian_log_prob`). Metrics:
    ``bc/nll``, ``bc/log_std`` (mean), ``bc/mse`` (squared error of the greedy action in
    unit coordinates) and ``bc/at_bound`` (fraction of action components on a face).
    """
    at_bound = unit_action.abs() >= 1.0 - edge
    if distribution == "clipped":
        per_dim = clipped_gaussian_log_prob(mean, log_std, unit_action, edge)
        per_dim = per_dim - torch.where(at_bound, torch.zeros_like(per_dim), log_half_width.expand_as(per_dim))
        greedy = mean.clamp(-1.0, 1.0)
    elif distribution == "tanh":
        per_dim = tanh_gaussian_log_prob(mean, log_std, unit_action, edge) - log_half_width
        greedy = torch.tanh(mean)
    else:
        raise ValueError(f"distribution must be 'clipped' or 'tanh', got {distribution!r}")
    loss = -per_dim.sum(-1).mean()
    with torch.no_grad():
        metrics = {"bc/nll": loss.detach(), "bc/log_std": log_std.mean(),
                   "bc/mse": (greedy - unit_action).pow(2).sum(-1).mean(),
                   "bc/at_bound": at_bound.float().mean()}
    return loss, metrics


# ============================================================================ networks
class GaussianPolicy(nn.Module):
    r"""Gaussian policy over a Box action space with state-dependent mean and log-std.

    ``forward(obs) -> (mean, log_std)``, each ``(B, A)``, in unit-box coordinates, from
    encoded observations. The log-std is squashed softly into ``log_std_bounds``
    (:math:`l + \tfrac12(h - l)(\tanh x + 1)`, as IQ-Learn's actor). ``distribution``
    (``"clipped"`` or ``"tanh"``) says how a Gaussian draw becomes an action in the box; see
    the module docstring. Actions in and out are in the environment's units.
    """

    def __init__(self, spaces: SpaceSpec, hidden_sizes: Sequence[int] = (256, 256),
                 distribution: Literal["clipped", "tanh"] = "clipped",
                 log_std_bounds: tuple[float, float] = (-5.0, 2.0)):
        super().__init__()
        if spaces["action_kind"] != "box":
            raise ValueError("GaussianPolicy needs a Box action space")
        if distribution not in ("clipped", "tanh"):
            raise ValueError(f"distribution must be 'clipped' or 'tanh', got {distribution!r}")
        self.distribution = distribution
        self.act_dim = spaces["action_dim"]
        self.log_std_bounds = (float(log_std_bounds[0]), float(log_std_bounds[1]))
        self.net = mlp(spaces["obs_dim"], list(hidden_sizes), 2 * self.act_dim)
        low = torch.tensor(spaces["action_low"], dtype=torch.float32)
        high = torch.tensor(spaces["action_high"], dtype=torch.float32)
        self.register_buffer("action_center", (high + low) / 2)
        self.register_buffer("action_half", (high - low) / 2)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean, raw = full_precision(self.net(obs)).chunk(2, dim=-1)
        lo, hi = self.log_std_bounds
        return mean, lo + 0.5 * (hi - lo) * (torch.tanh(raw) + 1.0)

    def to_unit(self, action: Tensor) -> Tensor:
        return (action.to(self.action_half.dtype) - self.action_center) / self.action_half

    def from_unit(self, unit: Tensor) -> Tensor:
        return self.action_center + self.action_half * unit

    def loss(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Metrics]:
        """Maximum-likelihood loss of data ``action`` ``(B, A)`` at encoded ``obs``."""
        mean, log_std = self(obs)
        unit = self.to_unit(action.reshape(action.shape[0], -1))
        return gaussian_bc_loss(mean, log_std, unit, self.action_half.log(), self.distribution)

    def log_prob(self, obs: Tensor, action: Tensor) -> Tensor:
        """Log-likelihood of ``action`` ``(B, A)`` in environment units, ``(B,)``."""
        mean, log_std = self(obs)
        unit = self.to_unit(action.reshape(action.shape[0], -1))
        if self.distribution == "tanh":
            return (tanh_gaussian_log_prob(mean, log_std, unit) - self.action_half.log()).sum(-1)
        at_bound = unit.abs() >= 1.0 - BOUNDARY_EDGE
        per_dim = clipped_gaussian_log_prob(mean, log_std, unit)
        return (per_dim - torch.where(at_bound, 0.0, self.action_half.log().expand_as(per_dim))).sum(-1)

    def mode(self, obs: Tensor) -> Tensor:
        """The greedy action ``(B, A)``: :math:`\\mathrm{clip}(\\mu)` or :math:`\\tanh(\\mu)` in the box."""
        mean, _ = self(obs)
        unit = mean.clamp(-1.0, 1.0) if self.distribution == "clipped" else torch.tanh(mean)
        return self.from_unit(unit)

    def rsample(self, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        r"""Reparameterised ``tanh`` draws :math:`c + h\tanh(\mu + \sigma\varepsilon)` from standard
        normals ``noise`` ``(B, M, A)``: actions ``(B, M, A)`` and their log densities in
        environment units ``(B, M)``, both differentiable in the policy's parameters."""
        if self.distribution != "tanh":
            raise ValueError("rsample needs distribution='tanh' (a clipped draw has no density on the faces)")
        mean, log_std = self(obs)
        mean, log_std = mean.unsqueeze(1), log_std.unsqueeze(1)
        u = mean + log_std.exp() * noise
        log_prob = (gaussian_log_prob(mean, log_std, u) - tanh_log_jacobian(u) - self.action_half.log()).sum(-1)
        return self.from_unit(torch.tanh(u)), log_prob

    @torch.no_grad()
    def candidates(self, obs: Tensor, num: int, std_scale: float = 1.0,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        r"""The greedy action and ``num`` draws, for choosing among them by a score.

        Pre-squashing points :math:`u_0 = \mu` and :math:`u_k = \mu + \text{std\_scale}\,
        \sigma\varepsilon_k`, mapped into the box as the policy maps its draws. Returns actions
        ``(B, 1+num, A)`` in environment units, the policy's log density of each point
        :math:`\log\mathcal N(u;\mu,\sigma^2)` (summed over dimensions) ``(B, 1+num)``, and
        the log density of what drew it, :math:`\mathcal N(\mu, (\text{std\_scale}\,
        \sigma)^2)` ``(B, 1+num)``. Densities are over :math:`u`, so they stay finite on the
        faces of a ``"clipped"`` policy, where many points share one action.
        """
        mean, log_std = self(obs)
        mean, log_std = mean.unsqueeze(1), log_std.unsqueeze(1)  # (B, 1, A)
        eps = torch.randn((obs.shape[0], num, self.act_dim), generator=generator, device=mean.device,
                          dtype=mean.dtype)
        draw_log_std = log_std + math.log(std_scale)
        u = torch.cat([mean, mean + draw_log_std.exp() * eps], 1)  # (B, 1+num, A)
        unit = u.clamp(-1.0, 1.0) if self.distribution == "clipped" else torch.tanh(u)
        return (self.from_unit(unit), gaussian_log_prob(mean, log_std, u).sum(-1),
                gaussian_log_prob(mean, draw_log_std, u).sum(-1))

    @torch.no_grad()
    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One action per state ``(B, A)``, drawn from the policy (clipped or squashed)."""
        mean, log_std = self(obs)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        u = mean + log_std.exp() * eps
        return self.from_unit(u.clamp(-1.0, 1.0) if self.distribution == "clipped" else torch.tanh(u))


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
        if not hidden_sizes:
            raise ValueError("hidden_sizes must name at least one hidden layer")
        if log_every_n_updates is not None and log_every_n_updates < 1:
            raise ValueError(f"log_every_n_updates must be at least 1, got {log_every_n_updates}")
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
