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
