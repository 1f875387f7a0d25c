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
(``_BaselineModule``): manual optimisation with per-optimizer toggling and explicit DDP
gradient averaging, the ``updates`` counter, throughput, the module's random stream,
the observation encoder's statistics from the data module, and checkpoint markers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .losses import Metrics
from .distributed import AtomicCheckpointIO, all_reduce_mean_, full_precision, is_distributed
from .networks import ObservationEncoder, mlp
from .reward import CHECKPOINT_KEY, check_checkpoint_model, read_checkpoint
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


class _BaselineModule(LightningModule):
    """What the baselines share with :class:`~bicql_lightning.BiCQLML`'s pattern.

    Subclasses set ``model_name``, call ``self.save_hyperparameters()`` and
    ``self._init_state()`` in ``__init__``, and implement ``_build(spaces)``; they build
    at once when given ``spaces`` and otherwise at ``setup`` from the data module.
    Hyperparameters read here: ``updates_per_sec_every``, ``log_every_n_updates`` and
    ``sample_seed``.
    """

    model_name = "?"

    def _init_state(self) -> None:
        self.automatic_optimization = False
        self.updates = 0  # training steps done; Lightning's global_step counts optimizer steps
        self._rate_mark: tuple[float, int] | None = None
        self._rate = torch.tensor(0.0)
        self.built = False
        self._generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None

    def _build(self, spaces: SpaceSpec) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"{self.model_name} trains on one device or with DDP (strategy='ddp', ...), not with "
                f"{type(strategy).__name__}: its networks are small and replicated on every process, "
                "and it averages gradients itself."
            )
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.built:
            if datamodule is not None and hasattr(datamodule, "spaces") and datamodule.spaces != self.spaces:
                raise ValueError(
                    f"The model was built for spaces {self.spaces} but the data module serves "
                    f"{datamodule.spaces}. Use a dataset of the same environment, or a new model."
                )
            return
        if datamodule is None or not hasattr(datamodule, "spaces"):
            raise ValueError(f"{self.model_name}(spaces=None) needs an OfflineIRLDataModule to take its spaces from.")
        self._build(check_spec(dict(datamodule.spaces)))

    def on_fit_start(self) -> None:
        world_size, _ = self._world()
        if self._generator is None or self._generator.device != self.device:
            seed = self._default_seed()
            if is_distributed(world_size):
                seed = self.trainer.strategy.broadcast(seed, src=0)  # one stream for all ranks
            self._make_generator(seed)
        datamodule = getattr(self.trainer, "datamodule", None)
        if not bool(self.encoder.initialized) and datamodule is not None and hasattr(datamodule, "obs_mean"):
            self.encoder.set_statistics(datamodule.obs_mean, datamodule.obs_std)

    # ------------------------------------------------------------------ distributed
    def _world(self) -> tuple[int, int]:
        """``(world_size, global_rank)``; ``(1, 0)`` outside a Trainer."""
        trainer = self._trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    @contextmanager
    def _local_backward(self) -> Iterator[None]:
        """Backward without DDP's gradient hooks: gradients stay local until averaged."""
        model = self._trainer.strategy.model if self._trainer is not None else None
        if isinstance(model, DistributedDataParallel):
            with model.no_sync():
                yield
        else:
            yield

    def _update(self, optimizer, loss: Tensor) -> None:
        """One optimizer update: zero_grad, local backward, gradients averaged over ranks, step."""
        optimizer.zero_grad(set_to_none=True)
        with self._local_backward():
            self.manual_backward(loss)
        world_size, _ = self._world()
        if is_distributed(world_size):
            grads = [p.grad for group in optimizer.optimizer.param_groups for p in group["params"]
                     if p.grad is not None]
            all_reduce_mean_(grads, world_size)
        optimizer.step()

    def _optimizer_list(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def _step(self, optimizer, objective, *args) -> Metrics:
        """toggle, zero_grad, backward, (average), step, untoggle: one update of ``optimizer``."""
        self.toggle_optimizer(optimizer)
        try:
            loss, metrics = objective(*args)
            self._update(optimizer, loss)
        finally:
            self.untoggle_optimizer(optimizer)
        return metrics

    def _mean_over_ranks(self, metrics: Metrics) -> Metrics:
        """Metrics of the global batch: each rank's values averaged (equal shares), one all_reduce."""
        world_size, _ = self._world()
        if not is_distributed(world_size):
            return metrics
        names = list(metrics)
        stacked = torch.stack([metrics[k].detach().float().reshape(()).to(self.device) for k in names])
        all_reduce_mean_([stacked], world_size)
        return dict(zip(names, stacked.unbind()))

    def _finish_step(self, metrics: Metrics) -> None:
        """Count the update and log one row every ``log_every_n_updates``."""
        self.updates += 1
        rate = self._updates_per_sec()
        every = self.hparams.log_every_n_updates or self.trainer.log_every_n_steps
        if self.updates % every == 0:
            metrics["train/updates_per_sec"] = rate.to(self.device)
            metrics = self._mean_over_ranks(metrics)
            metrics["train/updates"] = torch.tensor(float(self.updates))
            self.log_dict(metrics, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ throughput
    @property
    def updates_per_sec(self) -> float:
        """Training updates per second, measured over the last ``updates_per_sec_every`` updates."""
        return float(self._rate)

    def _updates_per_sec(self) -> Tensor:
        now = time.perf_counter()
        if self._rate_mark is None:
            self._rate_mark = (now, self.updates)
        elif self.updates - self._rate_mark[1] >= self.hparams.updates_per_sec_every:
            t0, u0 = self._rate_mark
            self._rate = torch.tensor((self.updates - u0) / max(now - t0, 1e-9))
            self._rate_mark = (now, self.updates)
        return self._rate

    # ------------------------------------------------------------------ random stream
    def _default_seed(self) -> int:
        if self.hparams.sample_seed is not None:
            return int(self.hparams.sample_seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _rng(self) -> torch.Generator:
        """The module's random stream, on the module's device (made on first use)."""
        if self._generator is None or self._generator.device != self.device:
            self._make_generator(self._default_seed())
        return self._generator

    def _make_generator(self, seed: int) -> None:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        pending, self._pending_generator_state = self._pending_generator_state, None
        if pending is not None:
            if pending.numel() == generator.get_state().numel():
                generator.set_state(pending)
            else:
                rank_zero_warn(
                    f"The checkpoint's random stream was saved on another kind of device; on "
                    f"{self.device.type} it restarts from seed {seed}."
                )
        self._generator = generator

    def _normal_noise(self, local_rows: int, shape: Sequence[int]) -> Tensor:
        """Standard normals ``(local_rows, *shape)`` for this rank's rows of a global batch:
        drawn for all ranks' rows from the module's stream and sliced, so that W processes
        draw what one process would."""
        world_size, rank = self._world()
        noise = torch.randn((local_rows * world_size, *shape), generator=self._rng(), device=self.device)
        return noise[rank * local_rows:(rank + 1) * local_rows]

    # ------------------------------------------------------------------ acting helpers
    def _obs_tensor(self, obs: np.ndarray | Tensor) -> tuple[Tensor, bool]:
        """Raw observation(s) as a batched tensor on the module's device, and whether it was one."""
        single_dims = 0 if self.spaces["obs_kind"] == "discrete" else 1
        obs_t = torch.as_tensor(np.asarray(obs) if not isinstance(obs, Tensor) else obs, device=self.device)
        single = obs_t.dim() == single_dims
        return (obs_t.unsqueeze(0) if single else obs_t), single

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"model": self.model_name, "updates": self.updates}
        if self._generator is not None:
            info["generator"] = self._generator.get_state()
        return info

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self._checkpoint_info()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_model(checkpoint, self.model_name)
        info = checkpoint[CHECKPOINT_KEY]
        self.updates = int(info["updates"])
        if info.get("generator") is not None:
            # Applied when the stream is (re)made on the training device (on_fit_start).
            self._generator = None
            self._pending_generator_state = info["generator"]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):  # type: ignore[override]
        """Lightning's loader, after checking the file holds this model (one clear error if not)."""
        if isinstance(checkpoint_path, (str, bytes)) or hasattr(checkpoint_path, "__fspath__"):
            read_checkpoint(checkpoint_path, cls.model_name)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)


# ============================================================================ the module
class BehaviorCloning(_BaselineModule):
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
        self.hparams["spaces"] = dict(spaces)
        self.spaces = spaces
        self.discrete = spaces["action_kind"] == "discrete"
        self.encoder = ObservationEncoder(spaces["obs_kind"], spaces["obs_dim"])
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
