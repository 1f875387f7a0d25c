"""Density models of actions: the Box proposal of the soft value and the clipped Gaussian.

* :class:`ActionProposal`: the fixed proposal :math:`q(a|s)` the importance-sampled soft
  value of Box actions draws from (a uniform/tanh-Gaussian mixture), fitted to data before
  training and frozen.
* :class:`GaussianPolicy`: a Gaussian in the action box's unit coordinates made bounded by
  clipping (exactly how the benchmark's experts act) or by ``tanh``. Behaviour cloning
  trains it; the default controller (:class:`~bicql_lightning.TiltedPriorPolicy`) fits one
  to the demonstrations and lets Q tilt it.
* :func:`fit_density`: the maximum-likelihood fit both are given before training.

Densities are with respect to Lebesgue measure in the environment's action units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from .distributed import full_precision
from .losses import Metrics
from .networks import ObservationEncoder, mlp
from .spaces import SpaceSpec

# Unit-box coordinates within this distance of ±1 count as on the box's face.
BOUNDARY_EDGE = 1e-6
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

# Keeps atanh finite for actions on the box's faces.
_EDGE = 1e-6
# Data actions are pulled this far inside the box before the proposal is fitted. Experts
# often act on the box's faces (45% of the hopper expert's action components), where
# atanh is unbounded: a few saturated actions then drag the fitted mean far off. Measured
# on hopper with one expert episode (proposal mode as the policy, 5 episodes): normalised
# score 35 with 1e-6, 98 with 0.05.
FIT_EDGE = 0.05


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
    the docstring of :mod:`bicql_lightning.bc`. Actions in and out are in the environment's units.
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
    def candidates(self, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""The greedy action and one draw per row of ``noise``, for choosing among them by a score.

        Pre-clipping points :math:`u_0 = \mu` and :math:`u_k = \mu + \sigma\varepsilon_k` with
        :math:`\varepsilon` = ``noise`` ``(B or 1, K, A)`` (one shared set broadcasts over the
        states, so a state's candidates do not depend on the batch it comes in), mapped into the
        box as the policy maps its draws. Returns actions ``(B, 1+K, A)`` in environment units
        and the log density of each point, :math:`\log\mathcal N(u;\mu,\sigma^2)` summed over
        dimensions, ``(B, 1+K)``: over :math:`u`, so it stays finite on the faces of a
        ``"clipped"`` policy, where many points share one action.
        """
        mean, log_std = self(obs)
        mean, log_std = mean.unsqueeze(1), log_std.unsqueeze(1)  # (B, 1, A)
        u = torch.cat([mean, mean + log_std.exp() * noise.to(mean.dtype)], 1)  # (B, 1+K, A)
        unit = u.clamp(-1.0, 1.0) if self.distribution == "clipped" else torch.tanh(u)
        return self.from_unit(unit), gaussian_log_prob(mean, log_std, u).sum(-1)

    @torch.no_grad()
    def sample(self, obs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One action per state ``(B, A)``, drawn from the policy (clipped or squashed)."""
        mean, log_std = self(obs)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        u = mean + log_std.exp() * eps
        return self.from_unit(u.clamp(-1.0, 1.0) if self.distribution == "clipped" else torch.tanh(u))


class ActionProposal(nn.Module):
    r"""Fixed proposal :math:`q(a|s)` for the sampled soft value of Box actions.

    A mixture of the uniform density on the action box (weight ``uniform_weight``)
    and a tanh-squashed Gaussian :math:`a = c + h\tanh(u)`, :math:`u\sim\mathcal N(\mu(s),
    \sigma(s)^2)`, fitted by maximum likelihood to data before training and frozen
    afterwards (EMaQ's idea: no policy is optimised). Densities are with respect to
    Lebesgue measure in the environment's action units, so the soft value does not
    depend on how the box is scaled.
    """

    def __init__(self, spec: SpaceSpec, hidden_sizes: Sequence[int] = (256, 256),
                 uniform_weight: float = 0.5):
        super().__init__()
        if not 0.0 <= uniform_weight <= 1.0:
            raise ValueError(f"proposal uniform_weight must be in [0, 1], got {uniform_weight}")
        self.act_dim = spec["action_dim"]
        self.uniform_weight = uniform_weight
        self.net = mlp(spec["obs_dim"], hidden_sizes, 2 * self.act_dim)
        low = torch.tensor(spec["action_low"], dtype=torch.float32)
        high = torch.tensor(spec["action_high"], dtype=torch.float32)
        self.register_buffer("action_center", (high + low) / 2)
        self.register_buffer("action_half", (high - low) / 2)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _gaussian(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        # The proposal is tiny and its densities feed log-sum-exps: always in the
        # parameters' precision, never autocast to bf16/fp16.
        dtype = self.net[0].weight.dtype
        with torch.autocast(obs.device.type, enabled=False):
            mu, log_std = self.net(obs.to(dtype)).chunk(2, dim=-1)
        return mu, log_std.clamp(-5.0, 2.0)  # (B, A) each

    def _log_prob_squashed(self, mu: Tensor, log_std: Tensor, unit: Tensor) -> Tensor:
        """log density of the squashed Gaussian at ``unit`` = actions in [-1, 1], (B, M, A)."""
        unit = unit.to(mu.dtype).clamp(-1 + _EDGE, 1 - _EDGE)
        u = torch.atanh(unit)
        z = (u - mu.unsqueeze(1)) / log_std.exp().unsqueeze(1)
        log_normal = -0.5 * z.pow(2) - log_std.unsqueeze(1) - 0.5 * math.log(2 * math.pi)
        log_jacobian = torch.log1p(-unit.pow(2)) + torch.log(self.action_half)
        return (log_normal - log_jacobian).sum(-1)  # (B, M)

    def log_prob(self, obs: Tensor, actions: Tensor) -> Tensor:
        """Mixture log density; obs ``(B, D)`` encoded, actions ``(B, M, A)`` -> ``(B, M)``."""
        unit = (actions - self.action_center) / self.action_half
        mu, log_std = self._gaussian(obs)
        log_squashed = self._log_prob_squashed(mu, log_std, unit)
        log_uniform = -torch.log(2 * self.action_half).sum()
        w = self.uniform_weight
        if w <= 0.0:
            return log_squashed
        if w >= 1.0:
            return log_uniform.expand_as(log_squashed)
        return torch.logaddexp(math.log(w) + log_uniform, math.log1p(-w) + log_squashed)

    def draw_noise(self, num_states: int, num_samples: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The random numbers ``sample`` turns into actions, for ``num_states`` states.

        Returns standard normals ``(N, M, A)``, uniforms on [0, 1) ``(N, M, A)`` and mixture
        picks ``(N, M, 1)`` (uniforms compared with the uniform weight), drawn in this
        order from ``generator`` in the parameters' dtype. Row ``i`` only ever feeds state
        ``i``: drawing for a global batch and slicing rows gives every process the numbers
        its share of the batch would get in a single-process run.
        """
        dtype = self.net[0].weight.dtype
        device = self.action_half.device if device is None else device
        shape = (num_states, num_samples, self.act_dim)
        normal = torch.randn(shape, device=device, dtype=dtype, generator=generator)
        uniform = torch.rand(shape, device=device, dtype=dtype, generator=generator)
        pick = torch.rand(num_states, num_samples, 1, device=device, dtype=dtype, generator=generator)
        return normal, uniform, pick

    @torch.no_grad()
    def sample(self, obs: Tensor, num_samples: int, generator: torch.Generator | None = None,
               noise: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``M`` actions per state: ``(B, M, A)`` actions and ``(B, M)`` log densities.

        ``noise`` (from :meth:`draw_noise`, one row per state) replaces drawing from
        ``generator``.
        """
        mu, log_std = self._gaussian(obs)
        if noise is None:
            noise = self.draw_noise(obs.shape[0], num_samples, generator, obs.device)
        normal, uniform, pick = noise
        squashed = torch.tanh(mu.unsqueeze(1) + log_std.exp().unsqueeze(1) * normal)
        unit = torch.where(pick < self.uniform_weight, uniform * 2 - 1, squashed)
        actions = self.action_center + self.action_half * unit
        return actions, self.log_prob(obs, actions)

    @torch.no_grad()
    def mode(self, obs: Tensor) -> Tensor:
        """The squashed Gaussian's centre ``(B, A)``: always one of the acting candidates."""
        mu, _ = self._gaussian(obs)
        return self.action_center + self.action_half * torch.tanh(mu)

    def nll(self, obs: Tensor, actions: Tensor) -> Tensor:
        """Mean negative log-likelihood of data actions under the squashed Gaussian alone
        (actions on or near the box's faces moved ``FIT_EDGE`` inside it)."""
        unit = ((actions - self.action_center) / self.action_half).clamp(-1 + FIT_EDGE, 1 - FIT_EDGE)
        mu, log_std = self._gaussian(obs)
        return -self._log_prob_squashed(mu, log_std, unit.unsqueeze(1)).mean()



def fit_density(net: nn.Module, nll: Callable[[Tensor, Tensor], Tensor], encoder: ObservationEncoder,
                obs: Tensor, actions: Tensor, steps: int, lr: float, generator: torch.Generator,
                batch_size: int = 256, weights: Tensor | None = None,
                schedule: Literal["constant", "cosine"] = "constant") -> Tensor:
    """Maximum likelihood by Adam on ``nll(encoded obs, actions)`` over minibatches drawn from
    ``generator``; ``net`` takes no gradients before or after. Returns the last minibatch's NLL.

    ``weights`` ``(N,)``, non-negative: a weighted likelihood, by drawing each minibatch's
    rows with probability proportional to their weight (uniformly without weights).
    ``schedule``: ``"constant"`` keeps ``lr``; ``"cosine"`` anneals it to 0 over ``steps``
    (as IQL's reference actor does), so the weights kept are an average over the last
    minibatches rather than one noisy step."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"fit schedule must be 'constant' or 'cosine', got {schedule!r}")
    device = generator.device
    obs, actions = obs.to(device), actions.to(device)
    if weights is not None:
        weights = weights.to(device=device, dtype=torch.float32)
        if weights.shape != (obs.shape[0],) or not bool(torch.isfinite(weights).all()) or weights.min() < 0 \
                or weights.sum() <= 0:
            raise ValueError(f"fit weights must be {obs.shape[0]} finite non-negative numbers, not all zero")
    net.requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None
    loss = torch.tensor(float("nan"))
    with torch.enable_grad():
        for _ in range(steps):
            if weights is None:
                idx = torch.randint(0, obs.shape[0], (min(batch_size, obs.shape[0]),), device=device,
                                    generator=generator)
            else:
                idx = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
            loss = nll(encoder(obs[idx]), actions[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if annealing is not None:
                annealing.step()
    net.requires_grad_(False)
    return loss.detach()
