r"""Offline IQ-Learn (inverse soft-Q learning; Garg et al. 2021, "IQ-Learn: Inverse soft-Q
Learning for Imitation", NeurIPS) as a LightningModule: the benchmark's IRL baseline.

IQ-Learn learns one soft Q function; the reward is implicit in it. With the soft value
:math:`V^\pi(s) = \mathbb E_{a\sim\pi}[Q(s,a) - T\log\pi(a|s)]` and the *inverse soft
Bellman operator* :math:`(\mathcal T^\pi Q)(s,a) = Q(s,a) - \gamma\,\mathbb E_{s'}V^\pi(s')`,
the paper maximises over Q (its objective :math:`\mathcal J^*`)

.. math::
    \mathcal J(\pi, Q) = \mathbb E_{\rho_E}\big[\phi\big(Q(s,a) - \gamma\,\mathbb E_{s'}V^\pi(s')\big)\big]
                         - (1-\gamma)\,\mathbb E_{\rho_0}[V^\pi(s_0)],

with :math:`\pi` the soft-optimal policy of Q (for Discrete actions
:math:`\pi_Q = \mathrm{softmax}(Q/T)`, :math:`V = T\log\sum_a e^{Q/T}` exactly; for Box
actions a SAC actor maximising :math:`\mathbb E_\pi[Q - T\log\pi]`). Offline, the
initial-state term is replaced by the paper's telescoped form, valid for the
state-transition distribution of any policy's trajectories from :math:`\rho_0`:
:math:`(1-\gamma)\mathbb E_{\rho_0}[V(s_0)] = \mathbb E_{(s,s')\sim\rho}[V(s) - \gamma V(s')]`;
with :math:`\rho = \rho_E` (expert transitions) it is the paper's offline choice
(``method.loss=value_expert`` in the authors' code). For the :math:`\chi^2` divergence
:math:`\phi(x) = x - x^2/(4\alpha)`: the quadratic term is the regulariser that keeps the
implicit reward bounded (the authors' ``method.chi=True``).

The recovered reward is :math:`r(s,a) = Q(s,a) - \gamma(1-\text{terminated})V(s')`
(the inverse soft Bellman operator applied to Q; :meth:`IQLearn.reward`). As in the rest
of the package only termination stops bootstrapping; a time-limit truncation does not.

The loss terms are the pure functions of this module (``chi2_phi``, ``soft_state_value``,
``expert_loss``, ``value_loss``, ``actor_loss``); :class:`IQLearn` orchestrates them.
Equation numbers differ between the paper's versions, so each docstring states its
formula in full.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from . import losses
from .base import OfflineModule, check_common_hparams
from .bc import Batch, frozen
from .densities import GaussianPolicy
from .losses import Metrics
from .distributed import full_precision
from .networks import QEnsemble
from .spaces import SpaceSpec, check_spec


# ============================================================================ losses
def chi2_phi(x: Tensor, alpha: float) -> Tensor:
    r"""The :math:`\chi^2` divergence's concave function :math:`\phi(x) = x - x^2/(4\alpha)`
    (IQ-Learn with the :math:`\chi^2` regulariser; ``alpha`` the authors' ``method.alpha``)."""
    return x - x.pow(2) / (4.0 * alpha)


def soft_state_value(q: Tensor, log_pi: Tensor, temperature: float) -> Tensor:
    r"""Monte-Carlo soft value :math:`V^\pi(s) = \mathbb E_{a\sim\pi}[Q(s,a) - T\log\pi(a|s)]`
    from ``M`` policy draws per state: ``q`` and ``log_pi`` ``(..., M)`` -> ``(...)``.

    (For Discrete actions with :math:`\pi = \mathrm{softmax}(Q/T)` this expectation is
    exactly :func:`bicql_lightning.losses.soft_value`, the log-sum-exp, used instead.)
    """
    return (q - temperature * log_pi).mean(-1)


def expert_loss(q_expert: Tensor, next_value: Tensor, terminated: Tensor, gamma: float,
                alpha: float) -> tuple[Tensor, Metrics]:
    r"""First term of IQ-Learn's loss (the negated objective):
    :math:`-\mathbb E_{\rho_E}[\phi(r)]`, :math:`r = Q(s,a) - \gamma(1-\text{terminated})V(s')`
    on expert transitions, :math:`\phi` the :math:`\chi^2` one (:func:`chi2_phi`).

    Expanded, :math:`-\mathbb E[r] + \mathbb E[r^2]/(4\alpha)`: the linear part is the
    paper's :math:`-\mathbb E_{\rho_E}[Q - \gamma V(s')]`, the quadratic part its
    :math:`\chi^2` regulariser. ``q_expert``: ``(E, B)`` (each critic of an ensemble has
    its own term, averaged, as in the authors' twin-critic code); ``next_value``,
    ``terminated``: ``(B,)``. Gradients flow through ``next_value`` when it carries them.
    """
    reward = losses.soft_advantage(q_expert, next_value.unsqueeze(0), terminated.unsqueeze(0), gamma)
    loss = -chi2_phi(reward, alpha).mean()
    with torch.no_grad():
        metrics = {"iq/expert_loss": loss.detach(), "iq/expert_reward": reward.mean(),
                   "iq/chi2": reward.pow(2).mean() / (4.0 * alpha), "iq/q_expert": q_expert.mean()}
    return loss, metrics


def value_loss(value: Tensor, next_value: Tensor, terminated: Tensor, gamma: float) -> tuple[Tensor, Metrics]:
    r"""Second term of IQ-Learn's loss, the offline (telescoped) form of
    :math:`(1-\gamma)\mathbb E_{\rho_0}[V(s_0)]`:
    :math:`\mathbb E_{(s,s')\sim\rho}[V(s) - \gamma(1-\text{terminated})V(s')]`.

    ``value``, ``next_value``, ``terminated``: ``(B,)`` at the transitions of the value
    data (expert transitions in the paper's offline setting).
    """
    diff = value - gamma * (1.0 - terminated.to(value.dtype)) * next_value
    loss = diff.mean()
    with torch.no_grad():
        metrics = {"iq/value_loss": loss.detach(), "iq/value": value.mean()}
    return loss, metrics


def actor_loss(q: Tensor, log_pi: Tensor, temperature: float) -> tuple[Tensor, Metrics]:
    r"""SAC policy loss :math:`\mathbb E_{s,\,a\sim\pi}[T\log\pi(a|s) - Q(s,a)]`: minimised,
    the actor maximises the soft value :math:`V^\pi(s)` of the current Q, i.e. becomes its
    soft-optimal policy :math:`\pi_Q` (Box actions; actions reparameterised so the
    gradient reaches the actor). ``q``, ``log_pi``: any equal shapes."""
    loss = (temperature * log_pi - q).mean()
    with torch.no_grad():
        metrics = {"actor/loss": loss.detach(), "actor/entropy": -log_pi.mean(), "actor/q": q.mean()}
    return loss, metrics


# ============================================================================ the module
class IQLearn(OfflineModule):
    r"""Offline IQ-Learn with the :math:`\chi^2` regulariser (see the module docstring).

    Args:
        spaces: observation/action spaces as a :class:`SpaceSpec` dict. Left ``None``,
            it is taken from the data module at ``setup`` (the CLI links it).
        hidden_sizes: hidden widths of each critic (BiCQLML's Q networks' default).
        actor_hidden_sizes: hidden widths of the Box actor.
        gamma: discount :math:`\gamma`.
        temperature: entropy temperature :math:`T` of the soft value and the policy
            (the authors' ``agent.init_temp``; their default 0.01, fixed).
        chi2_alpha: :math:`\alpha` of :math:`\phi(x) = x - x^2/(4\alpha)` (the authors'
            ``method.alpha``, 0.5). Smaller is a stronger pull of the implicit reward to 0.
        value_data: transitions of the value-difference term :math:`\mathbb E[V(s) -
            \gamma V(s')]`: ``"expert"`` (the paper's offline setting), ``"offline"`` (D), or
            ``"both"`` (the two batches together).
        twin_critics: two critics with the value taken from their minimum (the authors'
            ``DoubleQCritic``); ``False`` is their single critic (``SingleQCritic``, the
            MuJoCo and CartPole configurations).
        use_target: take :math:`V(s')` from a Polyak target critic (no gradient through it;
            :class:`~bicql_lightning.TargetNetworkUpdate` is added if none is configured);
            ``None``: ``True`` for Box actions, ``False`` for Discrete (the authors'
            MuJoCo and Discrete configurations). ``False`` takes the full gradient of the
            objective through :math:`V(s')`.
        q_lr: Adam learning rate of the critic(s).
        actor_lr: Adam learning rate of the Box actor (the authors' MuJoCo runs: 3e-5).
        actor_data: states the Box actor is trained on: ``"expert"`` (the authors' offline
            choice), ``"offline"`` or ``"both"``.
        num_value_samples: actor draws per state for the Box soft value in training.
        num_reward_samples: actor draws per state for the Box :math:`V(s')` of
            :meth:`reward` (a fixed stream, so the reward is a function of the weights).
        log_std_min: lower bound of the actor's log-std.
        log_std_max: upper bound of the actor's log-std.
        updates_per_sec_every: updates between two throughput measurements.
        log_every_n_updates: training metrics are logged every N updates; ``None`` follows
            the Trainer's ``log_every_n_steps``.
        sample_seed: seed of the module's random stream (the Box actor's draws in
            training); ``None`` takes the run's seed (``PL_GLOBAL_SEED``) or 0. Saved in
            checkpoints.

    One ``training_step`` (one *update*): one critic step on
    :math:`-\mathbb E_{\rho_E}[\phi(Q - \gamma V(s'))] + \mathbb E_\rho[V(s) - \gamma V(s')]`
    (actor frozen), then, for Box actions, one actor step on the SAC loss (critic frozen).

    Logged: ``iq/loss``, ``iq/expert_loss``, ``iq/value_loss``, ``iq/expert_reward``,
    ``iq/chi2``, ``iq/q_expert``, ``iq/value``, and for Box ``actor/loss``,
    ``actor/entropy``, ``actor/q``; ``train/updates_per_sec``, ``train/updates``;
    validation: ``val/expert_nll`` and ``val/expert_action_accuracy`` (Discrete),
    ``val/expert_action_mse`` (Box, unit-box coordinates), ``val/reward_mean``.
    """

    model_name = "IQLearn"

    def __init__(
        self,
        spaces: dict[str, Any] | None = None,
        hidden_sizes: list[int] = [256, 256],  # noqa: B006 - jsonargparse needs a literal
        actor_hidden_sizes: list[int] = [256, 256],  # noqa: B006
        gamma: float = 0.99,
        temperature: float = 0.01,
        chi2_alpha: float = 0.5,
        value_data: Literal["expert", "offline", "both"] = "expert",
        twin_critics: bool = False,
        use_target: bool | None = None,
        q_lr: float = 3e-4,
        actor_lr: float = 3e-5,
        actor_data: Literal["expert", "offline", "both"] = "expert",
        num_value_samples: int = 1,
        num_reward_samples: int = 32,
        log_std_min: float = -5.0,
        log_std_max: float = 2.0,
        updates_per_sec_every: int = 100,
        log_every_n_updates: int | None = None,
        sample_seed: int | None = None,
    ):
        super().__init__()
        for name, value in (("value_data", value_data), ("actor_data", actor_data)):
            if value not in ("expert", "offline", "both"):
                raise ValueError(f"{name} must be 'expert', 'offline' or 'both', got {value!r}")
        for name, value in (("num_value_samples", num_value_samples), ("num_reward_samples", num_reward_samples),
                            ("log_every_n_updates", 1 if log_every_n_updates is None else log_every_n_updates)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if chi2_alpha <= 0:
            raise ValueError(f"chi2_alpha must be positive, got {chi2_alpha}")
        check_common_hparams(gamma, hidden_sizes)
        self.save_hyperparameters()
        self._init_state()
        if spaces is not None:
            self._build(check_spec(dict(spaces)))

    # ------------------------------------------------------------------ construction
    def _build(self, spaces: SpaceSpec) -> None:
        hp = self.hparams
        self._adopt_spaces(spaces)
        self.use_target = (not self.discrete) if hp.use_target is None else bool(hp.use_target)
        self.q_net = QEnsemble(spaces, hp.hidden_sizes, ensemble_size=2 if hp.twin_critics else 1)
        # Always present (so a configured TargetNetworkUpdate works); read only with use_target.
        self.target_q_net = copy.deepcopy(self.q_net).requires_grad_(False)
        self.actor = (None if self.discrete else
                      GaussianPolicy(spaces, hp.actor_hidden_sizes, "tanh", (hp.log_std_min, hp.log_std_max)))
        self.built = True

    def configure_optimizers(self):
        q_opt = torch.optim.Adam(self.q_net.parameters(), lr=self.hparams.q_lr)
        if self.actor is None:
            return q_opt
        return q_opt, torch.optim.Adam(self.actor.parameters(), lr=self.hparams.actor_lr)

    def configure_callbacks(self):
        from .callbacks import TargetNetworkUpdate

        # Called before setup: a model left to take its spaces from the data module is not built yet.
        use_target = self.hparams.use_target
        if use_target is None:
            spaces = self.spaces if self.built else getattr(getattr(self.trainer, "datamodule", None), "spaces", None)
            use_target = spaces is not None and spaces["action_kind"] == "box"
        if not use_target or any(isinstance(cb, TargetNetworkUpdate) for cb in self.trainer.callbacks):
            return []
        return [TargetNetworkUpdate()]

    # ------------------------------------------------------------------ values
    def _critic(self, net: QEnsemble, obs: Tensor, actions: Tensor | None = None) -> Tensor:
        """Critic outputs on encoded ``obs``: ``(E, B, A)`` (Discrete, all actions) or ``(E, B[, M])``."""
        return full_precision(net(obs) if actions is None else net(obs, actions))

    def _q_data(self, net: QEnsemble, obs: Tensor, action: Tensor) -> Tensor:
        """Each critic's Q at the data actions, ``(E, B)``."""
        if self.discrete:
            q_all = self._critic(net, obs)
            index = action.long().view(1, -1, 1).expand(q_all.shape[0], -1, 1)
            return q_all.gather(2, index).squeeze(2)
        return self._critic(net, obs, action)

    def _value(self, net: QEnsemble, obs: Tensor, noise: Tensor | None = None) -> Tensor:
        r"""Soft value :math:`V(s)` of the critics' minimum at encoded ``obs``, ``(B,)``.

        Discrete: exact :math:`T\log\sum_a\exp(Q/T)`. Box: :func:`soft_state_value` over
        actor draws from standard normals ``noise`` ``(B, M, A)`` (no gradient into the
        actor; gradients reach the critic unless called under ``no_grad``).
        """
        T = self.hparams.temperature
        if self.discrete:
            return losses.soft_value(self._critic(net, obs).min(0).values, T)
        with torch.no_grad():
            actions, log_pi = self.actor.rsample(obs, noise)
        q = self._critic(net, obs, actions).min(0).values  # (B, M)
        return soft_state_value(q, log_pi, T)

    def _train_noise(self, *segments: int, samples: int | None = None) -> Tensor | None:
        """Box: standard normals ``(sum(segments), M, A)`` for the actor's draws, one global
        block per segment (the local sizes of the batches a batch concatenates), so every
        state gets the numbers it would get in one process. Discrete: ``None``."""
        if self.discrete:
            return None
        shape = (samples or self.hparams.num_value_samples, self.spaces["action_dim"])
        return torch.cat([self._normal_noise(rows, shape) for rows in segments])

    def _segments(self, which: str, expert: Batch, offline: Batch) -> tuple[int, ...]:
        sizes = {"expert": (expert["obs"].shape[0],), "offline": (offline["obs"].shape[0],)}
        return sizes[which] if which in sizes else sizes["expert"] + sizes["offline"]

    def _pick(self, which: str, expert: Batch, offline: Batch) -> Batch:
        if which == "expert":
            return expert
        if which == "offline":
            return offline
        return {k: torch.cat([expert[k], offline[k]]) for k in expert}

    # ------------------------------------------------------------------ objectives
    def critic_objective(self, expert: Batch, offline: Batch | None = None) -> tuple[Tensor, Metrics]:
        r"""IQ-Learn's critic loss: :func:`expert_loss` on the expert batch plus
        :func:`value_loss` on the value data (``value_data``)."""
        hp = self.hparams
        offline = expert if offline is None else offline
        value_batch = self._pick(hp.value_data, expert, offline)
        segments = self._segments(hp.value_data, expert, offline)
        obs_e = self.encoder(expert["obs"])
        next_e = self.encoder(expert["next_obs"])
        # Noise is drawn in a fixed order (expert s', value s, value s'), one global block each.
        noise_next_e = self._train_noise(obs_e.shape[0])
        if self.use_target:
            with torch.no_grad():
                next_value_e = self._value(self.target_q_net, next_e, noise_next_e)
        else:
            next_value_e = self._value(self.q_net, next_e, noise_next_e)
        q_e = self._q_data(self.q_net, obs_e, expert["action"])
        loss_e, metrics = expert_loss(q_e, next_value_e, expert["terminated"], hp.gamma, hp.chi2_alpha)

        if value_batch is expert:
            obs_v, next_value_v = obs_e, next_value_e
        else:
            obs_v = self.encoder(value_batch["obs"])
            next_v = self.encoder(value_batch["next_obs"])
            noise = self._train_noise(*segments)
            if self.use_target:
                with torch.no_grad():
                    next_value_v = self._value(self.target_q_net, next_v, noise)
            else:
                next_value_v = self._value(self.q_net, next_v, noise)
        value_v = self._value(self.q_net, obs_v, self._train_noise(*segments))
        loss_v, v_metrics = value_loss(value_v, next_value_v, value_batch["terminated"], hp.gamma)
        metrics.update(v_metrics)
        loss = loss_e + loss_v
        metrics["iq/loss"] = loss.detach()
        return loss, metrics

    def actor_objective(self, states: Tensor, segments: tuple[int, ...] | None = None) -> tuple[Tensor, Metrics]:
        """SAC actor loss (:func:`actor_loss`) at raw ``states``; the critic is frozen.
        ``segments``: local sizes of the batches ``states`` concatenates (default: one)."""
        obs = self.encoder(states)
        noise = self._train_noise(*(segments or (obs.shape[0],)), samples=1)
        actions, log_pi = self.actor.rsample(obs, noise)  # (B, 1, A), (B, 1)
        with frozen(self.q_net):
            q = self._critic(self.q_net, obs, actions).min(0).values  # (B, 1)
        return actor_loss(q, log_pi, self.hparams.temperature)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> None:
        expert, offline = batch["expert"], batch["offline"]
        opts = self._optimizer_list()
        metrics = self._step(opts[0], self.critic_objective, expert, offline)
        if self.actor is not None:
            which = self.hparams.actor_data
            states = self._pick(which, expert, offline)["obs"]
            metrics.update(self._step(opts[1], self.actor_objective, states, self._segments(which, expert, offline)))
        self._finish_step(metrics)

    def validation_step(self, batch: dict[str, Batch], batch_idx: int) -> None:
        expert = batch["expert"]
        obs = self.encoder(expert["obs"])
        if self.discrete:
            q_all = self._critic(self.q_net, obs).min(0).values
            q_data = q_all.gather(1, expert["action"].long().view(-1, 1)).squeeze(1)
            value = losses.soft_value(q_all, self.hparams.temperature)
            self.log("val/expert_nll", losses.expert_nll(value, q_data, self.hparams.temperature),
                     prog_bar=True, sync_dist=True)
            self.log("val/expert_action_accuracy", (q_all.argmax(1) == expert["action"].long()).float().mean(),
                     sync_dist=True)
        else:
            greedy = self.actor.to_unit(self.actor.mode(obs))
            target = self.actor.to_unit(expert["action"].reshape(obs.shape[0], -1))
            self.log("val/expert_action_mse", (greedy - target).pow(2).sum(-1).mean(), prog_bar=True, sync_dist=True)
        self.log("val/reward_mean", self.reward(expert["obs"], expert["action"], expert["next_obs"],
                                                expert["terminated"]).mean(), sync_dist=True)

    # ------------------------------------------------------------------ reward and acting
    @torch.no_grad()
    def reward(self, obs: np.ndarray | Tensor, action: np.ndarray | Tensor, next_obs: np.ndarray | Tensor,
               terminated: np.ndarray | Tensor | None = None) -> Tensor:
        r"""The recovered reward :math:`r(s,a) = Q(s,a) - \gamma(1-\text{terminated})V(s')`, ``(B,)``.

        Raw (unnormalised) batched observations and environment-unit actions, as tensors
        or arrays; ``terminated`` defaults to all false. Q and V are those of the critics'
        minimum (the online critic). For Box actions :math:`V(s')` averages
        ``num_reward_samples`` actor draws, the same fixed draws for every row, so the
        reward is a function of the weights and of each transition alone. Identifiable,
        like any IRL reward, only up to potential shaping.
        """
        def tensor(x: Any, dtype: torch.dtype | None = None) -> Tensor:
            return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, device=self.device,
                                   dtype=dtype)

        obs_t, next_t = tensor(obs), tensor(next_obs)
        enc, next_enc = self.encoder(obs_t), self.encoder(next_t)
        action_t = tensor(action)
        if not self.discrete:
            action_t = action_t.reshape(enc.shape[0], -1).to(torch.float32)
        done = (torch.zeros(enc.shape[0], device=self.device) if terminated is None
                else tensor(terminated, torch.float32).reshape(-1))
        q = self._q_data(self.q_net, enc, action_t).min(0).values
        noise = None
        if not self.discrete:
            # One draw shared by every row: each transition's reward is then a function of
            # that transition alone, whatever batch it is scored in (one at a time in
            # LearnedRewardWrapper, all of D in bench.run).
            gen = torch.Generator(device=self.device).manual_seed(0)
            noise = torch.randn((1, self.hparams.num_reward_samples, self.spaces["action_dim"]),
                                generator=gen, device=self.device).expand(enc.shape[0], -1, -1)
        next_value = self._value(self.q_net, next_enc, noise)
        return losses.soft_advantage(q, next_value, done, self.hparams.gamma)

    def predict_reward(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray,
                       terminated: np.ndarray | None = None) -> np.ndarray:
        """:meth:`reward` on numpy arrays, returning numpy ``(B,)``."""
        return self.reward(obs, action, next_obs, terminated).cpu().numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor, deterministic: bool = True) -> np.ndarray:
        r"""Action(s) for raw observation(s).

        Discrete: argmax of the critics' minimum (``deterministic``) or a draw from
        :math:`\mathrm{softmax}(Q/T)`. Box: the actor's :math:`\tanh(\mu)` (``deterministic``)
        or a draw from it.
        """
        obs_t, single = self._obs_tensor(obs)
        enc = self.encoder(obs_t)
        if self.discrete:
            q = self._critic(self.q_net, enc).min(0).values
            action = (q.argmax(1) if deterministic else
                      torch.distributions.Categorical(logits=q / self.hparams.temperature).sample())
        else:
            action = self.actor.mode(enc) if deterministic else self.actor.sample(enc)
        out = action.cpu().numpy()
        return out[0] if single else out
