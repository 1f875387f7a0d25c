"""Networks: the twin Q ensemble, the observation encoder and the Box-action proposal.

The twin Q functions are one ensemble with stacked weights, so both twins cost one
batched matmul per layer. For Box actions the first layer is split into a state part
and an action part: the state part is computed once per state and broadcast over the
M sampled actions, which is most of the work of a soft-value estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .spaces import SpaceSpec

# Keeps atanh finite for actions on the box's faces.
_EDGE = 1e-6
# Data actions are pulled this far inside the box before the proposal is fitted. Experts
# often act on the box's faces (45% of the hopper expert's action components), where
# atanh is unbounded: a few saturated actions then drag the fitted mean far off. Measured
# on hopper with one expert episode (proposal mode as the policy, 5 episodes): normalised
# score 35 with 1e-6, 98 with 0.05.
FIT_EDGE = 0.05


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers applied as one batched matmul.

    Input ``(N, in)`` (shared by all members) or ``(E, N, in)``; output ``(E, N, out)``.
    """

    def __init__(self, ensemble_size: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features)) if bias else None
        # Same initialisation as nn.Linear, member by member.
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.matmul(x, self.weight)  # (E, N, out), broadcasting a shared input
        return out if self.bias is None else out + self.bias


class ObservationEncoder(nn.Module):
    """Raw observations to network inputs: standardised Box or one-hot Discrete.

    The statistics are buffers, so they travel with every checkpoint and every copy of
    a network that owns an encoder (the reward network carries its own).
    """

    def __init__(self, obs_kind: str, obs_dim: int):
        super().__init__()
        self.obs_kind = obs_kind
        self.obs_dim = obs_dim
        self.register_buffer("mean", torch.zeros(obs_dim))
        self.register_buffer("std", torch.ones(obs_dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype).reshape(self.obs_dim))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype).reshape(self.obs_dim))
        self.initialized.fill_(True)

    def forward(self, obs: Tensor) -> Tensor:
        if self.obs_kind == "discrete":
            return nn.functional.one_hot(obs.long().reshape(-1), self.obs_dim).to(self.mean.dtype)
        obs = obs.reshape(obs.shape[0], -1).to(self.mean.dtype)
        return (obs - self.mean) / self.std


def float32_head(layers: nn.Sequential, x: Tensor) -> Tensor:
    """``layers`` with the last one in float32, also under autocast (bf16-mixed).

    The hidden layers are most of the work and tolerate bf16; the outputs (Q values,
    rewards) do not: a Q of 300 in bf16 is only known to within 1, more than the
    reward differences the soft advantage has to resolve. The head is a matrix-vector
    product, so keeping it in float32 costs next to nothing.
    """
    h = layers[:-1](x)
    with torch.autocast(device_type=h.device.type, enabled=False):
        return layers[-1](h.float())


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class QEnsemble(nn.Module):
    """Twin (or ``E``-member) soft Q functions over encoded observations.

    Discrete actions: ``forward(obs) -> (E, B, A)``.
    Box actions: ``forward(obs, actions)`` with actions ``(B, A)`` gives ``(E, B)`` and
    with ``(B, M, A)`` gives ``(E, B, M)``. Actions are given in the environment's
    units and scaled to ``[-1, 1]`` inside.
    """

    def __init__(self, spec: SpaceSpec, hidden_sizes: Sequence[int], ensemble_size: int = 2):
        super().__init__()
        if not hidden_sizes:
            raise ValueError("hidden_sizes must name at least one hidden layer")
        self.discrete = spec["action_kind"] == "discrete"
        obs_dim, act_dim = spec["obs_dim"], spec["action_dim"]
        hidden = list(hidden_sizes)
        first = hidden[0]
        self.state_in = EnsembleLinear(ensemble_size, obs_dim, first)
        if not self.discrete:
            self.action_in = EnsembleLinear(ensemble_size, act_dim, first, bias=False)
            low = torch.tensor(spec["action_low"], dtype=torch.float32)
            high = torch.tensor(spec["action_high"], dtype=torch.float32)
            self.register_buffer("action_center", (high + low) / 2)
            self.register_buffer("action_half", (high - low) / 2)
        body: list[nn.Module] = [nn.ReLU()]
        for width_in, width_out in zip(hidden[:-1], hidden[1:]):
            body += [EnsembleLinear(ensemble_size, width_in, width_out), nn.ReLU()]
        body.append(EnsembleLinear(ensemble_size, hidden[-1], act_dim if self.discrete else 1))
        self.body = nn.Sequential(*body)
        self.ensemble_size = ensemble_size

    def forward(self, obs: Tensor, actions: Tensor | None = None) -> Tensor:
        h = self.state_in(obs)  # (E, B, H): once per state
        if self.discrete:
            return float32_head(self.body, h)  # (E, B, A)
        if actions is None:
            raise ValueError("Box-action Q networks need actions")
        single = actions.dim() == 2
        acts = actions.unsqueeze(1) if single else actions  # (B, M, A)
        B, M, _ = acts.shape
        acts = (acts - self.action_center) / self.action_half
        ha = self.action_in(acts.reshape(B * M, -1)).reshape(self.ensemble_size, B, M, -1)
        h = (h.unsqueeze(2) + ha).reshape(self.ensemble_size, B * M, -1)  # (E, B*M, H)
        q = float32_head(self.body, h).reshape(self.ensemble_size, B, M)
        return q[..., 0] if single else q

    def hidden_weight_groups(self) -> list[list[Tensor]]:
        """Weights of every layer but the output head, ``(E, in, out)`` each, grouped by layer:
        the split first layer of Box actions is one layer (state and action parts stacked
        along ``in``), so its spectral norm is that of the whole first layer."""
        first = [self.state_in.weight] + ([] if self.discrete else [self.action_in.weight])
        body = [m.weight for m in self.body if isinstance(m, EnsembleLinear)][:-1]
        return [first] + [[w] for w in body]


def mlp_hidden_weight_groups(layers: nn.Sequential) -> list[list[Tensor]]:
    """Weights ``(out, in)`` of every ``nn.Linear`` of an :func:`mlp` but the output head, one group each."""
    return [[m.weight] for m in layers if isinstance(m, nn.Linear)][:-1]


@torch.no_grad()
def clip_spectral_norm_(groups: Sequence[Sequence[Tensor]], in_dim: int, bound: float = 1.0) -> None:
    r"""Project each layer onto :math:`\{W : \|W\|_2 \le` ``bound``:math:`\}`, in place.

    A group is one layer's weights split along its input axis ``in_dim`` (``-2`` for
    :class:`EnsembleLinear`'s ``(E, in, out)``, ``-1`` for ``nn.Linear``'s ``(out, in)``);
    leading axes are ensemble members, each projected on its own. The exact largest
    singular value (``torch.linalg.matrix_norm(ord=2)``, batched over members) is cheap
    for the small layers this is meant for, and needs no power-iteration state: the
    projection is a function of the weights alone, so it is identical on every DDP rank
    and nothing extra goes into checkpoints. Dividing by :math:`\max(1, \sigma/b)` leaves
    layers already inside the ball untouched (a projection, as in Gouk et al. 2021), unlike
    Miyato et al.'s reparametrisation :math:`W/\sigma`, which pins every norm at 1.
    """
    for group in groups:
        joined = torch.cat(list(group), dim=in_dim) if len(group) > 1 else group[0]
        sigma = torch.linalg.matrix_norm(joined.float(), ord=2)  # (E,) or ()
        scale = (sigma / bound).clamp_min(1.0).to(joined.dtype).unsqueeze(-1).unsqueeze(-1)
        for w in group:
            w.div_(scale)


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

    def gaussian_log_prob(self, obs: Tensor, actions: Tensor, std_scale: float = 1.0) -> Tensor:
        """Log density under the squashed Gaussian alone (its standard deviation times
        ``std_scale``); shapes as :meth:`log_prob`."""
        mu, log_std = self._gaussian(obs)
        return self._log_prob_squashed(mu, log_std + math.log(std_scale),
                                       (actions - self.action_center) / self.action_half)

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
    def sample_gaussian(self, obs: Tensor, num_samples: int, generator: torch.Generator | None = None,
                        std_scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """``M`` actions per state from the squashed Gaussian alone, its standard deviation
        times ``std_scale``, with their log densities under that Gaussian (what drew them):
        ``(B, M, A)`` and ``(B, M)``."""
        mu, log_std = self._gaussian(obs)
        log_std = log_std + math.log(std_scale)
        normal = torch.randn((obs.shape[0], num_samples, self.act_dim), device=obs.device, dtype=mu.dtype,
                             generator=generator)
        unit = torch.tanh(mu.unsqueeze(1) + log_std.exp().unsqueeze(1) * normal)
        return self.action_center + self.action_half * unit, self._log_prob_squashed(mu, log_std, unit)

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


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    r"""Move the target network toward the online one: :math:`\bar\phi \leftarrow (1-\tau)\bar\phi + \tau\phi`.

    ``tau = 1`` is a hard copy. Buffers are copied outright.
    """
    target_params = list(target.parameters())
    online_params = list(online.parameters())
    if tau >= 1.0:
        torch._foreach_copy_(target_params, online_params)
    else:
        torch._foreach_lerp_(target_params, online_params, tau)
    for t_buf, o_buf in zip(target.buffers(), online.buffers()):
        t_buf.copy_(o_buf)
