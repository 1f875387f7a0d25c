r"""The learned reward shaped by the learned soft value, for RL from scratch.

BiCQL-ML trains a reward :math:`r_\theta` and, under it, a conservative :math:`Q`. For an
agent that learns online from scratch (SAC, PPO) the reward alone is a sparse signal: on a
task that ends episodes at a fall most of it sits near one level and pays the expert's
gait only where the expert went. Potential-based shaping (Ng, Harada and Russell, 1999)

.. math:: r'(s, a, s') = r_\theta(s, a) + \gamma\,(1 - \text{terminated})\,\Phi(s') - \Phi(s)

changes no policy's ranking (an episode's discounted return moves by :math:`-\Phi(s_0)`,
whatever the agent does, when :math:`\Phi` is 0 after termination), and with
:math:`\Phi = V`, the soft value of the same module's :math:`Q`, it is close to the soft
advantage :math:`Q(s,a) - V(s)`: each step is scored by what the learned :math:`Q` expects
of it, not only by its own reward. AIRL's reward carries the same kind of term.

:math:`V(s)` is the module's own estimator (the twins' pointwise minimum, the sampled
soft maximum over its frozen proposal), with one fixed draw of proposal noise shared by
every state, so :math:`\Phi` is a deterministic function of the observation.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .losses import sampled_soft_value, soft_value
from .policies import batch_observations
from .reward import RewardNet


def pair_batch(encoder: Any, state: Any, action: Any) -> tuple[Tensor, Tensor, bool]:
    """Numpy pair(s) as a batch on ``encoder``'s device, and whether one came unbatched: what a
    scorer of pairs hands to its ``forward`` (``RankedReward.predict`` calls it one pair at a time)."""
    state_t, single = batch_observations(state, encoder.obs_kind, encoder.mean.device)
    action_t = torch.as_tensor(np.asarray(action), device=state_t.device)
    return state_t, (action_t.reshape(1, -1) if single else action_t), single


class SoftValuePotential(nn.Module):
    r""":math:`\Phi(s) = V(s)`, the soft value of a trained BiCQL-ML module's Q twins' minimum.

    ``num_samples``: proposal samples per state for Box actions (the module trains with
    ``num_action_samples``; more here lowers the estimator's bias, the noise is fixed
    either way); ``seed``: the fixed draw's seed.
    """

    def __init__(self, module: Any, num_samples: int = 64, seed: int = 0):
        super().__init__()
        if getattr(module, "q_net", None) is None or not hasattr(module, "reward_net"):
            raise ValueError("SoftValuePotential needs a trained BiCQLML module (its q_net and reward_net).")
        self.encoder = module.encoder
        self.q_net = module.q_net
        self.proposal = module.proposal
        self.temperature = float(module.hparams.temperature)
        self.gamma = float(module.hparams.gamma)
        if self.proposal is not None:
            generator = torch.Generator().manual_seed(seed)
            noise = self.proposal.draw_noise(1, num_samples, generator, device="cpu")
            for name, tensor in zip(("noise_normal", "noise_uniform", "noise_pick"), noise):
                self.register_buffer(name, tensor)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def forward(self, obs: Tensor) -> Tensor:
        """``(B, ...)`` raw observations -> ``(B,)`` soft values."""
        return self.of_encoded(self.encoder(obs))

    @torch.no_grad()
    def of_encoded(self, encoded: Tensor) -> Tensor:
        """``forward`` for observations already through the module's encoder."""
        if self.proposal is None:
            return soft_value(self.q_net(encoded).float().min(0).values, self.temperature)
        rows = encoded.shape[0]
        noise = tuple(x.expand(rows, -1, -1) for x in (self.noise_normal, self.noise_uniform, self.noise_pick))
        actions, log_prop = self.proposal.sample(encoded, self.noise_normal.shape[1], noise=noise)
        q = self.q_net(encoded, actions).float().min(0).values  # (B, M)
        return sampled_soft_value(q, log_prop, self.temperature)

    def batch(self, obs: np.ndarray | Tensor) -> tuple[Tensor, bool]:
        """Observation(s) as a batch on this potential's device, and whether one came unbatched."""
        return batch_observations(obs, self.encoder.obs_kind, self.encoder.mean.device)

    def predict(self, obs: np.ndarray) -> np.ndarray:
        """``forward`` on numpy observations, batched or one."""
        obs_t, single = self.batch(obs)
        out = self(obs_t).cpu().numpy()
        return out[0] if single else out


class SoftAdvantage(nn.Module):
    r""":math:`A(s,a) = \min_i Q_i(s,a) - V(s)`, a trained BiCQL-ML module's soft advantage.

    Under the module's Boltzmann policy :math:`\pi(a|s) \propto \exp(Q(s,a)/T)` it is
    :math:`T \log \pi(a|s)` (up to the proposal's density for Box actions): how much the
    controller prefers ``a`` to its own average in ``s``, a score of the action *given*
    the state. The reward :math:`r_\theta` regresses onto :math:`Q(s,a) - \gamma V(s')`
    and carries mostly the state's level; :math:`A` carries the action's choice, the
    part an agent learning from scratch needs at states the expert never visited.
    :math:`V` is :class:`SoftValuePotential`'s (fixed noise), so :math:`A` is a
    deterministic function of the pair. ``batch`` and ``forward(state, action)`` make it
    a scorer for :class:`~bicql_lightning.RankedReward`.
    """

    def __init__(self, module: Any, num_samples: int = 64, seed: int = 0):
        super().__init__()
        self.value = SoftValuePotential(module, num_samples, seed)
        self.discrete = self.value.proposal is None
        self.requires_grad_(False).eval()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, num_samples: int = 64, seed: int = 0) -> SoftAdvantage:
        """The soft advantage of a checkpoint written by ``BiCQLML``, on the CPU."""
        from .module import BiCQLML

        return cls(BiCQLML.load_from_checkpoint(path, map_location="cpu"), num_samples, seed)

    @torch.no_grad()
    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        """``(B, ...)`` raw observations and ``(B, ...)`` actions -> ``(B,)`` soft advantages."""
        # One encoder pass (and for Discrete one Q pass) serves Q(s, a) and V(s): this runs at every step.
        encoded = self.value.encoder(state)
        if self.discrete:
            table = self.value.q_net(encoded).float().min(0).values  # (B, A)
            q = table.gather(1, action.long().reshape(-1, 1)).squeeze(1)
            return q - soft_value(table, self.value.temperature)
        q = self.value.q_net(encoded, action.reshape(action.shape[0], -1).float()).float().min(0).values
        return q - self.value.of_encoded(encoded)

    def batch(self, state: Any, action: Any) -> tuple[Tensor, Tensor, bool]:
        """Numpy pair(s) as a batch on this module's device, and whether one came unbatched."""
        return pair_batch(self.value.encoder, state, action)


class PolicyLogLikelihood(nn.Module):
    r""":math:`\log\pi(a|s)`, the log-likelihood of a pair under a trained module's controller.

    In entropy-regularised RL the optimal policy's log-likelihood is the soft advantage,
    :math:`T\log\pi^*(a|s) = Q^*(s,a) - V^*(s)`, a reward that differs from the one it
    is optimal for by the shaping potential :math:`V`. :class:`SoftAdvantage` reads it off
    Q with the proposal as the reference measure; this reads it off the policy that acts:
    the default controller's (:class:`~bicql_lightning.TiltedPriorPolicy`) prior, refitted to
    D weighted by the soft advantage, and tilted by :math:`\exp(Q/T)` where it acts tilted
    (:meth:`~bicql_lightning.policies.QPolicy.log_prob`). It pays "act as the controller
    would here" and, unlike :math:`A`, it does not pay actions the controller would never
    draw. ``batch`` and ``forward(state, action)`` make it a scorer for
    :class:`~bicql_lightning.RankedReward`.

    ``relative=True`` scores :math:`\log\pi(a|s) - \log\pi(a^*(s)|s)`, :math:`a^*` the
    controller's greedy action: the same order of actions at each state, with the state's
    own level (how confident the controller is there) removed, so that no state pays more
    than another for the action the controller would play.
    """

    def __init__(self, module: Any, relative: bool = False):
        super().__init__()
        if getattr(module, "policy", None) is None or getattr(module, "encoder", None) is None:
            raise ValueError("PolicyLogLikelihood needs a trained BiCQLML module (its encoder and policy).")
        self.encoder = module.encoder
        self.policy = module.policy
        self.relative = bool(relative)
        self.requires_grad_(False).eval()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, relative: bool = False) -> PolicyLogLikelihood:
        """The controller's log-likelihood of a checkpoint written by ``BiCQLML``, on the CPU."""
        from .module import BiCQLML

        return cls(BiCQLML.load_from_checkpoint(path, map_location="cpu"), relative)

    @torch.no_grad()
    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        """``(B, ...)`` raw observations and ``(B, ...)`` actions -> ``(B,)`` log-likelihoods."""
        encoded = self.encoder(state)
        log_pi = self.policy.log_prob(encoded, action)
        if not self.relative:
            return log_pi
        return log_pi - self.policy.log_prob(encoded, self.policy.actions(encoded, deterministic=True))

    def batch(self, state: Any, action: Any) -> tuple[Tensor, Tensor, bool]:
        """Numpy pair(s) as a batch on this module's device, and whether one came unbatched."""
        return pair_batch(self.encoder, state, action)


class ShapedReward:
    r""":math:`r_\theta(s,a) + \gamma(1-\text{done})\Phi(s') - \Phi(s)` with imitation's
    ``predict(state, action, next_state, done)``, for :class:`~bicql_lightning.LearnedRewardWrapper`.

    ``done`` must be *termination* only (the wrapper passes ``terminated``): at a time limit
    the agent still bootstraps from :math:`s'`, so :math:`\Phi(s')` stays.
    """

    def __init__(self, reward_net: RewardNet, potential: SoftValuePotential, gamma: float | None = None):
        self.reward_net = reward_net.eval()
        self.potential = potential
        self.gamma = potential.gamma if gamma is None else float(gamma)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, num_samples: int = 64, seed: int = 0,
                        gamma: float | None = None) -> ShapedReward:
        """The reward and soft value of a checkpoint written by ``BiCQLML``, on the CPU."""
        from .module import BiCQLML

        reward_net = RewardNet.from_checkpoint(path)
        module = BiCQLML.load_from_checkpoint(path, map_location="cpu")
        return cls(reward_net, SoftValuePotential(module, num_samples, seed), gamma)

    def predict(self, state: np.ndarray, action: np.ndarray, next_state: np.ndarray,
                done: np.ndarray) -> np.ndarray:
        reward = np.asarray(self.reward_net.predict(state, action), dtype=np.float64)
        (s, single), (s_next, _) = self.potential.batch(state), self.potential.batch(next_state)
        # One pass over s and s' together: this runs at every environment step.
        phi, phi_next = np.split(self.potential(torch.cat([s, s_next])).double().cpu().numpy(), 2)
        if single:
            phi, phi_next = phi[0], phi_next[0]
        return reward + self.gamma * (1.0 - np.asarray(done, dtype=np.float64)) * phi_next - phi
