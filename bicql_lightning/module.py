r"""BiCQL-ML as a LightningModule: conservative Q-learning and soft-advantage reward
regression, alternated with manual optimisation.

One ``training_step`` (one *update* in this package's counters):

1. ``q_updates`` times, reward frozen, on the offline batch from :math:`D`:
   :math:`L_Q = \sum_i (Q_i(s,a) - y)^2 + \alpha\sum_i \mathbb E_P[V_i(s) - Q_i(s,a)]`,
   :math:`y = r_\theta(s,a) + \gamma(1-\text{terminated})\bar V(s')`;
2. ``reward_updates`` times, Q frozen, on the expert batch from :math:`D_E`:
   :math:`L_R = (r_\theta(s,a) - [Q(s,a) - \gamma(1-\text{terminated})V(s')])^2`.

No policy is optimised: acting samples the Boltzmann policy
:math:`\pi(a|s)\propto\exp(Q(s,a)/T)`. For Box actions the soft value is the
importance-sampled estimate of :func:`~bicql_lightning.losses.sampled_soft_value` under a
fixed proposal fitted to data before training.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from . import losses
from .base import OfflineModule
from .bc import GaussianPolicy
from .distributed import all_reduce_mean_, broadcast_, full_precision, is_distributed
from .networks import ActionProposal, QEnsemble, clip_spectral_norm_, mlp_hidden_weight_groups
from .reward import RewardNet
from .spaces import SpaceSpec, check_spec

Batch = dict[str, Tensor]

# Range of the adaptive alpha: a target gap the data cannot reach (below the expert's own
# entropy, say) would otherwise drive log alpha without bound.
LOG_ALPHA_MIN, LOG_ALPHA_MAX = float(np.log(1e-3)), float(np.log(1e3))


def _cat(a: Batch, b: Batch) -> Batch:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def expert_like_episodes(reward: Tensor, episode: Tensor, expert_level: Tensor | float, fraction: float) -> Tensor:
    r"""Which transitions ``(N,)`` of D belong to episodes the learned reward ranks as expert-like.

    An episode is kept when its mean learned reward per transition :math:`\bar r_k` reaches
    :math:`\bar r_D + f(\bar r_E - \bar r_D)`, with :math:`\bar r_D` the mean over D's
    transitions, :math:`\bar r_E` = ``expert_level`` (the mean over D_E's) and :math:`f` =
    ``fraction``. A per-transition mean, so that episodes of any length compare; the episode
    with the highest mean is always kept. ``reward`` ``(N,)``, ``episode`` ``(N,)`` integer ids.
    """
    reward = reward.double()
    episode = episode.long().to(reward.device)  # the data may live on the CPU, the model on a GPU
    num = int(episode.max()) + 1
    sums = torch.zeros(num, dtype=torch.float64, device=reward.device).index_add_(0, episode, reward)
    counts = torch.bincount(episode, minlength=num)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, -torch.inf))  # (K,)
    level = reward.mean()
    keep = means >= level + fraction * (torch.as_tensor(expert_level, dtype=torch.float64) - level)
    keep[means.argmax()] = True
    return keep[episode]


class BiCQLML(OfflineModule):
    r"""Offline inverse RL by bi-level conservative Q-learning and maximum likelihood.

    Args:
        spaces: observation/action spaces as a :class:`SpaceSpec` dict. Left ``None``,
            it is taken from the data module at ``setup`` (the CLI links it).
        hidden_sizes: hidden widths of each twin Q network.
        reward_hidden_sizes: hidden widths of the reward network.
        gamma: discount :math:`\gamma`.
        temperature: Boltzmann temperature :math:`T` of the soft value and the policy.
        alpha: CQL coefficient :math:`\alpha`.
        cql_data: pairs the conservative term is taken on: ``"offline"`` (CQL(H) on
            :math:`D`), ``"expert"`` (the expert likelihood), or ``"both"``. V and Q are
            always taken at the same states.
        q_updates: :math:`K_Q`, Q updates per step (on the same offline batch).
        reward_updates: :math:`K_R`, reward updates per step (on the same expert batch).
        q_lr: Adam learning rate of the Q networks.
        reward_lr: Adam learning rate of the reward network.
        reward_bound: ``b > 0`` bounds the reward as :math:`b\tanh(r/b)`, pinning the
            loop's neutral direction; ``0`` leaves it unbounded.
        reward_on_offline: also regress the reward onto the soft advantage on the offline
            pairs, so :math:`r_\theta` is fitted wherever Q-learning bootstraps through it.
        advantage_net: the Q network whose soft advantage the reward is regressed onto:
            ``"online"`` (the paper's :math:`Q` right after its update) or ``"target"``
            (the Polyak-averaged :math:`\bar Q` that the TD targets use). With
            ``"target"`` the reward follows the slower network (a two-timescale loop) and
            the soft values :math:`\bar V(s')` of the step's TD targets are reused: one
            sampled soft value less per update, about a fifth of a Box update's work.
        cql_target_gap: adaptive conservatism (CQL-Lagrange): ``None`` keeps
            :math:`\alpha` = ``alpha`` fixed; a number :math:`\tau` tunes :math:`\alpha` by
            dual steps on :math:`\log\alpha` after each step's Q updates
            (:func:`~bicql_lightning.losses.cql_alpha_dual_loss`), raising it while the CQL
            gap :math:`\mathbb E_P[V - Q]` (``cql/gap``; on expert pairs :math:`T` times the
            expert NLL) exceeds :math:`\tau`. ``alpha`` is the starting value;
            :math:`\alpha` is kept in ``[1e-3, 1e3]``, saved in checkpoints (buffer
            ``log_alpha``) and logged as ``cql/alpha``.
        cql_alpha_lr: step size of the dual (plain gradient) steps on :math:`\log\alpha`.
        spectral_norm: after every Q update, project each hidden layer of the Q networks
            (all but the output head) onto spectral norm :math:`\le 1`, per twin. This
            bounds the Lipschitz constant of the features in the encoded input, one way to
            approach the contraction condition :math:`L_Q L_{ML} < 1` of the paper's
            theorem; the head stays free so Q can still span the value scale
            :math:`r_{max}/(1-\gamma)`.
        reward_spectral_norm: the same for the reward network's hidden layers, after every
            reward update.
        reward_target: what the reward is regressed onto: ``"soft_advantage"`` (the paper's
            surrogate :math:`Q(s,a) - \gamma(1-\text{terminated})V(s')`) or ``"q"``
            (:math:`Q(s,a)` itself, no soft value: an ablation; its fixed point is the
            soft-optimal Q only when :math:`\gamma = 0`).
        cql_value_with_data_action: Box actions: the conservative term's soft value
            :math:`V(s)` is estimated from the data action and the M proposal samples
            together (each weighted by :math:`1/q`), instead of the samples alone. The
            data action then sits inside the partition estimate, as the positive does in
            InfoNCE: once Q ranks it above the samples the term stops pushing, rather than
            driving Q(s, a) ever higher against a few samples.
        num_action_samples: ``M``, proposal samples per state for the Box soft value.
        num_act_candidates: candidates per state when acting with Box actions.
        act_policy: the Box-action controller. ``"boltzmann"``: the paper's
            :math:`\pi(a|s)\propto\exp(Q(s,a)/T)` over candidates from the proposal
            (greedy: the best candidate by Q). ``"proposal_weighted"``:
            :math:`\pi(a|s)\propto q(a|s)\exp(Q(s,a)/T)` over candidates from the
            proposal's Gaussian (greedy: the best by :math:`Q/T + \log q`). With M
            samples the importance-sampled soft value rarely visits actions where
            :math:`q` is small, so the conservative term rarely pushes Q down there and Q
            overrates them; weighting by :math:`q` undoes that where it matters for acting.
            Measured on hopper, N = 1, 3000 updates (README): normalised score 10.3 -> 64.5
            (expert-only) and 14.5 -> 69.4 (with mixed data).
        act_temperature: the temperature of the acting policy; ``None`` (default) is
            ``temperature``, the paper's choice. With ``"proposal_weighted"`` it sets how far
            Q may move the controller from the proposal: :math:`Q/T_\text{act} + \log q` is
            the KL-regularised improvement of :math:`q` with coefficient :math:`T_\text{act}`.
            Training never uses it.
        act_candidate_scale: ``"proposal_weighted"`` only: the acting candidates are drawn
            from the Gaussian of ``act_prior`` with its standard deviation times this factor
            (the scores still use the prior's own density). Below 1 the greedy controller
            chooses among actions near the prior's mode (hopper with the tanh proposal, 0.5
            against 1: ``git show 90a4c2c:README.md``); sampled actions
            (``deterministic=False``) then come out narrower than the tilted prior, as the
            importance weights lose their finite variance below 1/sqrt(2).
        act_prior: ``"proposal_weighted"`` only: the behaviour density :math:`q` that Q
            tilts when acting. ``"proposal"``: the proposal's mixture (training's sampler).
            ``"clipped_gaussian"``: a separate Gaussian policy whose draws are clipped to the
            box (:class:`~bicql_lightning.bc.GaussianPolicy`, as the benchmark's experts act),
            fitted by exact (censored) maximum likelihood to the ``proposal_data`` pairs
            before training and frozen. The tanh-squashed proposal puts demonstrations'
            saturated actions at the edge of an exploding density, and its mode varies with
            the fit's seed (hopper: its mode scores 50-98 over seeds); the clipped fit's mode
            scored 95-100 on every hopper weight tried (bench/NOTES.md).
        act_prior_fit_steps: maximum-likelihood steps fitting the ``"clipped_gaussian"`` prior.
        act_prior_lr: learning rate of that fit. A checkpoint keeps the act_prior it was
            trained with: the fitted prior's weights are part of it.
        act_prior_data: the pairs the ``"clipped_gaussian"`` prior is fitted to: ``"expert"``
            (D_E), ``"offline"`` (D) or ``null`` (``proposal_data``'s). ``"both"`` fits one
            prior to each and acts by generalised policy improvement: each prior's candidates
            are tilted by Q as above, and of the two winners the one with the higher Q is
            played. Where D holds more than D_E this lets Q choose, state by state, between
            cloning the demonstrations and cloning the logged data (which is the better
            controller depends on the logged data: bench/NOTES.md); where D is D_E there is
            one prior. ``"expert_like"``: the prior is fitted to D_E before training and, where D
            holds more than D_E, replaced after the last training epoch by a prior fitted to
            the episodes of D that the final learned reward ranks as expert-like
            (:func:`expert_like_episodes` with ``expert_like_fraction``; D_E's own episodes,
            being in D, rank among them). This is how the learned reward labels logged data that
            cloning cannot: a clone of all of D copies its random actions too (halfcheetah
            with-mixed N = 1, same weights: 6.1 for the mode of D's prior, 98.2 for that of the
            expert-like episodes' prior; bench/NOTES.md). The refit comes before the final
            rollout evaluation and the last checkpoint; a run resumed past it fits again with
            its new final reward.
        expert_like_fraction: ``act_prior_data="expert_like"`` only: :math:`f` of
            :func:`expert_like_episodes`; an episode of D is kept when its mean learned reward
            per transition reaches :math:`\bar r_D + f(\bar r_E - \bar r_D)` (0: above D's
            mean, 1: as high as D_E's).
        proposal_data: data the Box proposal's Gaussian is fitted to, ``"expert"`` or
            ``"offline"``.
        proposal_uniform_weight: weight of the uniform component of the Box proposal.
        proposal_hidden_sizes: hidden widths of the Box proposal.
        proposal_fit_steps: maximum-likelihood steps fitting the proposal before training.
        proposal_lr: learning rate of the proposal fit.
        updates_per_sec_every: updates between two throughput measurements.
        log_every_n_updates: training metrics are logged every N updates (logging every
            update costs more than a small network's update); ``None`` follows the
            Trainer's ``log_every_n_steps``, so every row a logger writes is fresh.
        proposal_seed: seed of the module's own random stream, which draws the proposal
            fit's minibatches and the Box proposal samples of every update (Discrete
            actions use none); ``None`` takes the run's seed (``seed_everything``, i.e.
            ``PL_GLOBAL_SEED``), or 0 without one. The stream's state is saved in
            checkpoints.

    Distributed training (``strategy="ddp"``, any ``devices``/``num_nodes``): every
    process holds the same networks and draws the same global batch, of which it uses
    its own contiguous share (the data module's ``batch_size`` is the global batch). Each
    Q or reward update runs its backward pass outside DDP's gradient hooks and then
    averages exactly the gradients of the optimizer being stepped with one flattened
    ``all_reduce``; proposal samples are drawn for the global batch from the module's
    stream and sliced the same way. Together this makes W processes with batch B/W the
    same algorithm as one process with batch B (up to float summation order), keeps
    every network, target network and optimizer state identical on all ranks, and
    needs no ``find_unused_parameters``.
    """

    model_name = "BiCQLML"
    seed_hparam = "proposal_seed"

    def _checkpoint_info(self) -> dict[str, Any]:
        # RewardNet.from_checkpoint rebuilds the reward network from this entry alone.
        info = super()._checkpoint_info()
        info["reward_net"] = {"spaces": dict(self.spaces), "hidden_sizes": list(self.hparams.reward_hidden_sizes),
                              "reward_bound": float(self.hparams.reward_bound)}
        return info

    def __init__(
        self,
        spaces: dict[str, Any] | None = None,
        hidden_sizes: list[int] = [256, 256],  # noqa: B006 - jsonargparse needs a literal
        reward_hidden_sizes: list[int] = [256, 256],  # noqa: B006
        gamma: float = 0.99,
        temperature: float = 1.0,
        alpha: float = 1.0,
        cql_data: Literal["offline", "expert", "both"] = "both",
        q_updates: int = 1,
        reward_updates: int = 1,
        q_lr: float = 3e-4,
        reward_lr: float = 3e-4,
        reward_bound: float = 5.0,
        reward_on_offline: bool = True,
        advantage_net: Literal["online", "target"] = "online",
        cql_target_gap: float | None = None,
        cql_alpha_lr: float = 1e-3,
        spectral_norm: bool = False,
        reward_spectral_norm: bool = False,
        reward_target: Literal["soft_advantage", "q"] = "soft_advantage",
        cql_value_with_data_action: bool = False,
        num_action_samples: int = 10,
        num_act_candidates: int = 64,
        act_policy: Literal["boltzmann", "proposal_weighted"] = "boltzmann",
        act_temperature: float | None = None,
        act_candidate_scale: float = 1.0,
        act_prior: Literal["proposal", "clipped_gaussian"] = "proposal",
        act_prior_fit_steps: int = 20000,
        act_prior_lr: float = 3e-4,
        act_prior_data: Literal["expert", "offline", "both", "expert_like"] | None = None,
        expert_like_fraction: float = 0.5,
        proposal_data: Literal["expert", "offline"] = "expert",
        proposal_uniform_weight: float = 0.5,
        proposal_hidden_sizes: list[int] = [256, 256],  # noqa: B006
        proposal_fit_steps: int = 2000,
        proposal_lr: float = 1e-3,
        updates_per_sec_every: int = 100,
        log_every_n_updates: int | None = None,
        proposal_seed: int | None = None,
    ):
        super().__init__()
        if cql_data not in ("offline", "expert", "both"):
            raise ValueError(f"cql_data must be 'offline', 'expert' or 'both', got {cql_data!r}")
        if advantage_net not in ("online", "target"):
            raise ValueError(f"advantage_net must be 'online' or 'target', got {advantage_net!r}")
        if reward_target not in ("soft_advantage", "q"):
            raise ValueError(f"reward_target must be 'soft_advantage' or 'q', got {reward_target!r}")
        if cql_target_gap is not None and alpha <= 0:
            raise ValueError(f"adaptive conservatism (cql_target_gap) needs a positive starting alpha, got {alpha}")
        if act_policy not in ("boltzmann", "proposal_weighted"):
            raise ValueError(f"act_policy must be 'boltzmann' or 'proposal_weighted', got {act_policy!r}")
        if act_prior not in ("proposal", "clipped_gaussian"):
            raise ValueError(f"act_prior must be 'proposal' or 'clipped_gaussian', got {act_prior!r}")
        if act_prior != "proposal" and act_policy != "proposal_weighted":
            raise ValueError(f"act_prior={act_prior!r} is the density that act_policy='proposal_weighted' "
                             f"tilts by Q; with act_policy={act_policy!r} leave act_prior at 'proposal'")
        if act_prior_data not in (None, "expert", "offline", "both", "expert_like"):
            raise ValueError(f"act_prior_data must be 'expert', 'offline', 'both', 'expert_like' or null, got "
                             f"{act_prior_data!r}")
        if act_prior_data is not None and act_prior != "clipped_gaussian":
            raise ValueError(f"act_prior_data chooses the data of the clipped_gaussian acting prior; with "
                             f"act_prior={act_prior!r} leave it null")
        if not np.isfinite(expert_like_fraction):
            raise ValueError(f"expert_like_fraction must be a finite number (0: episodes above D's mean learned "
                             f"reward, 1: as high as D_E's), got {expert_like_fraction}")
        if proposal_data not in ("expert", "offline"):
            raise ValueError(f"proposal_data must be 'expert' or 'offline', got {proposal_data!r}")
        for name, value in (("q_updates", q_updates), ("reward_updates", reward_updates),
                            ("log_every_n_updates", 1 if log_every_n_updates is None else log_every_n_updates),
                            ("num_action_samples", num_action_samples),
                            ("num_act_candidates", num_act_candidates),
                            ("act_prior_fit_steps", act_prior_fit_steps)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if act_candidate_scale <= 0:
            raise ValueError(f"act_candidate_scale must be positive, got {act_candidate_scale}")
        if act_temperature is not None and act_temperature <= 0:
            raise ValueError(f"act_temperature must be positive (or null: the training temperature), "
                             f"got {act_temperature}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        self.save_hyperparameters()
        self._init_state()
        if cql_target_gap is not None:
            # A buffer: saved in checkpoints, moved with the module, and (being stepped by
            # the same all-reduced gap on every rank) identical under DDP.
            self.register_buffer("log_alpha", torch.tensor(float(np.log(alpha))))
        if spaces is not None:
            self._build(check_spec(dict(spaces)))

    # ------------------------------------------------------------------ construction
    def _build(self, spaces: SpaceSpec) -> None:
        hp = self.hparams
        self._adopt_spaces(spaces)
        self.q_net = QEnsemble(spaces, hp.hidden_sizes, ensemble_size=2)
        self.target_q_net = copy.deepcopy(self.q_net).requires_grad_(False)
        self.reward_net = RewardNet(spaces, hp.reward_hidden_sizes, hp.reward_bound)
        self.proposal = (None if self.discrete else
                         ActionProposal(spaces, hp.proposal_hidden_sizes, hp.proposal_uniform_weight))
        if self.proposal is not None:
            # Fitted once before training (fit_proposal), then frozen: no gradients, and
            # not part of what DDP's reducer tracks.
            self.proposal.requires_grad_(False)
        self.behavior_prior = (GaussianPolicy(spaces, hp.proposal_hidden_sizes, "clipped").requires_grad_(False)
                          if hp.act_prior == "clipped_gaussian" and not self.discrete else None)
        if self.behavior_prior is not None:
            self.register_buffer("behavior_prior_fitted", torch.zeros((), dtype=torch.bool))
        # D's prior ("both": all of D, "expert_like": its expert-like episodes); offline_prior_used
        # stays False where D is D_E.
        self.offline_prior = (GaussianPolicy(spaces, hp.proposal_hidden_sizes, "clipped").requires_grad_(False)
                              if self.behavior_prior is not None and hp.act_prior_data in ("both", "expert_like")
                              else None)
        if self.offline_prior is not None:
            self.register_buffer("offline_prior_fitted", torch.zeros((), dtype=torch.bool))
            self.register_buffer("offline_prior_used", torch.zeros((), dtype=torch.bool))
        self.built = True

    # ------------------------------------------------------------------ distributed
    def _mean_over_ranks(self, metrics: losses.Metrics) -> losses.Metrics:
        """Metrics of the global batch: each rank's values averaged (equal shares), one all_reduce."""
        world_size, _ = self._world()
        sq_mean = metrics.pop("_reward/sq_mean", None)
        if not is_distributed(world_size):
            return metrics
        names = list(metrics) + (["_sq"] if sq_mean is not None else [])
        values = [metrics[k] for k in metrics] + ([sq_mean] if sq_mean is not None else [])
        stacked = torch.stack([v.detach().float().reshape(()).to(self.device) for v in values])
        all_reduce_mean_([stacked], world_size)
        out = dict(zip(names, stacked.unbind()))
        if sq_mean is not None and "reward/mean" in out:
            # The global standard deviation, not the mean of the ranks' ones.
            out["reward/std"] = (out.pop("_sq") - out["reward/mean"].pow(2)).clamp_min(0).sqrt()
        return out

    # ------------------------------------------------------------------ random stream
    def _sample_actions(self, obs: Tensor, segments: Sequence[int] | None = None,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Proposal samples for this rank's states.

        In training (no ``generator``) the rows of ``obs`` are this rank's shares of global
        segments (one per part of the batch: ``segments`` are the local sizes, in order):
        the noise is drawn for each whole segment from the module's stream and the rank's
        rows are sliced out, so every state gets the numbers it would get in one process.
        """
        num = self.hparams.num_action_samples
        if generator is not None:
            return self.proposal.sample(obs, num, generator=generator)
        world_size, rank = self._world()
        segments = [obs.shape[0]] if segments is None else list(segments)
        if sum(segments) != obs.shape[0]:
            raise ValueError(f"segments {segments} do not add up to the {obs.shape[0]} states")
        pieces = []
        for local in segments:
            noise = self.proposal.draw_noise(local * world_size, num, self._rng(), obs.device)
            pieces.append([x[rank * local:(rank + 1) * local] for x in noise])
        noise = tuple(torch.cat(parts) for parts in zip(*pieces))
        return self.proposal.sample(obs, num, noise=noise)

    def _eval_generator(self) -> torch.Generator:
        """A fresh, fixed stream for validation: its metrics are functions of the weights,
        and validation never moves the training stream (sanity checks, resumed runs)."""
        return torch.Generator(device=self.device).manual_seed(self._default_seed() + 1)

    def configure_optimizers(self):
        # On a GPU the update is bound by kernel launches at these sizes: one fused kernel
        # per Adam step instead of a few per parameter tensor.
        fused = self.device.type == "cuda"
        q_opt = torch.optim.Adam(self.q_net.parameters(), lr=self.hparams.q_lr, fused=fused)
        r_opt = torch.optim.Adam(self.reward_net.parameters(), lr=self.hparams.reward_lr, fused=fused)
        return q_opt, r_opt

    def configure_callbacks(self):
        from .callbacks import TargetNetworkUpdate

        # Without target syncing the TD targets never move: add the default unless the
        # user configured one.
        if any(isinstance(cb, TargetNetworkUpdate) for cb in self.trainer.callbacks):
            return []
        return [TargetNetworkUpdate()]

    def on_fit_start(self) -> None:
        needs_statistics = not bool(self.reward_net.encoder.initialized)
        super().on_fit_start()  # the random stream and the Q networks' normalisation
        self._clip_spectral_norms()  # start inside the constraint set (idempotent on resume)
        world_size, _ = self._world()
        datamodule = getattr(self.trainer, "datamodule", None)
        if needs_statistics and datamodule is not None and hasattr(datamodule, "obs_mean"):
            # The reward network carries its own copy, so it works outside this module.
            self.reward_net.encoder.set_statistics(datamodule.obs_mean, datamodule.obs_std)
        # Fitted once before training, each on its pairs (gathered once per data set), in this
        # order: the module's stream feeds every fit.
        hp = self.hparams
        prior_data = ("expert" if hp.act_prior_data in ("both", "expert_like")
                      else (hp.act_prior_data or hp.proposal_data))
        unfitted = []
        if self.proposal is not None and not bool(self.proposal.fitted):
            unfitted.append(("the Box-action proposal", self.proposal, self.fit_proposal, hp.proposal_data))
        if self.behavior_prior is not None and not bool(self.behavior_prior_fitted):
            unfitted.append(("the clipped_gaussian acting prior", self.behavior_prior, self.fit_behavior_prior,
                             prior_data))
        if (self.offline_prior is not None and not bool(self.offline_prior_fitted)
                and hp.act_prior_data == "both"):  # "expert_like": fitted after training instead
            unfitted.append(("the acting prior of the offline data", self.offline_prior, self.fit_offline_prior,
                             "offline"))
        if unfitted and datamodule is None:
            raise ValueError(f"Fitting {unfitted[0][0]} needs the data module's transitions: pass an "
                             "OfflineIRLDataModule to fit.")
        same_data = hasattr(datamodule, "offline_store") and datamodule.offline_store is datamodule.expert_store
        pairs = {}  # gathered (copied) once per data set
        for _, net, fit, which in unfitted:
            if net is self.offline_prior and same_data:
                self.offline_prior_fitted.fill_(True)  # D is D_E: the expert prior is that fit
                continue
            which = "expert" if same_data else which
            if which not in pairs:
                pairs[which] = datamodule.proposal_pairs(which)
            fit(*pairs[which])
            if is_distributed(world_size):
                # Every rank fitted the same data with the same stream; make the copies
                # identical even where a device's kernels are not bit-reproducible.
                broadcast_(list(net.parameters()), src=0)

    def fit_proposal(self, obs: Tensor, actions: Tensor, batch_size: int = 256) -> Tensor:
        """Fit the proposal's Gaussian by maximum likelihood, then freeze it. Returns the final NLL."""
        assert self.proposal is not None
        nll = self._fit_frozen(self.proposal, self.proposal.nll, obs, actions, self.hparams.proposal_fit_steps,
                               self.hparams.proposal_lr, batch_size)
        self.proposal.fitted.fill_(True)
        return nll

    def fit_behavior_prior(self, obs: Tensor, actions: Tensor, batch_size: int = 256) -> Tensor:
        """Fit the ``"clipped_gaussian"`` acting prior by maximum likelihood, then freeze it.
        Returns the final NLL."""
        assert self.behavior_prior is not None
        nll = self._fit_clipped_prior(self.behavior_prior, obs, actions, batch_size)
        self.behavior_prior_fitted.fill_(True)
        return nll

    def fit_offline_prior(self, obs: Tensor, actions: Tensor, batch_size: int = 256) -> Tensor:
        """Fit D's acting prior (``act_prior_data`` ``"both"``: all of D's pairs; ``"expert_like"``:
        those of its expert-like episodes) as :meth:`fit_behavior_prior` fits D_E's; it is used
        from then on."""
        assert self.offline_prior is not None
        nll = self._fit_clipped_prior(self.offline_prior, obs, actions, batch_size)
        self.offline_prior_fitted.fill_(True)
        self.offline_prior_used.fill_(True)
        return nll

    def on_train_epoch_end(self) -> None:
        if self.offline_prior is None or self.hparams.act_prior_data != "expert_like":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or datamodule.offline_store is datamodule.expert_store:
            return  # D is D_E: the expert prior is that fit
        if not self._last_epoch():
            return
        kept = self.fit_offline_prior_to_expert_like(datamodule)
        world_size, _ = self._world()
        if is_distributed(world_size):
            broadcast_(list(self.offline_prior.parameters()), src=0)
        self.log("train/offline_prior_kept", kept, on_step=False, on_epoch=True)

    def _last_epoch(self) -> bool:
        """Whether training stops after this epoch (Lightning's own stopping rules, read at
        ``on_train_epoch_end`` where the epoch already counts as processed)."""
        trainer, loop = self.trainer, self.trainer.fit_loop
        return bool(trainer.should_stop
                    or (loop.max_steps is not None and loop.max_steps >= 0 and trainer.global_step >= loop.max_steps)
                    or (loop.max_epochs is not None and loop.max_epochs >= 0
                        and loop.epoch_progress.current.processed >= loop.max_epochs))

    @torch.no_grad()
    def learned_rewards(self, obs: Tensor, actions: Tensor, chunk: int = 1 << 14) -> Tensor:
        """:math:`r_\theta(s,a)` ``(N,)`` for raw observations and actions, in chunks."""
        out = [full_precision(self.reward_net(obs[i:i + chunk].to(self.device), actions[i:i + chunk].to(self.device)))
               for i in range(0, obs.shape[0], chunk)]
        return torch.cat(out)

    def _store_rewards(self, store, chunk: int = 1 << 14) -> Tensor:
        """:meth:`learned_rewards` over a data module's store, chunk by chunk: no copy of its
        observations."""
        return torch.cat([self.learned_rewards(*store.pairs(slice(i, i + chunk)))
                          for i in range(0, len(store), chunk)])

    def fit_offline_prior_to_expert_like(self, datamodule) -> float:
        """Fit D's acting prior to the episodes of D that the current reward ranks as
        expert-like (``expert_like_fraction``); returns the share of D's transitions kept."""
        store = datamodule.offline_store
        keep = expert_like_episodes(self._store_rewards(store), store.episode,
                                    self._store_rewards(datamodule.expert_store).double().mean(),
                                    self.hparams.expert_like_fraction)
        index = keep.nonzero().squeeze(1).to(store.device)  # only the kept pairs are gathered
        self.fit_offline_prior(*store.pairs(index))
        return float(keep.float().mean())

    def _fit_clipped_prior(self, prior: GaussianPolicy, obs: Tensor, actions: Tensor, batch_size: int) -> Tensor:
        return self._fit_frozen(prior, lambda o, a: prior.loss(o, a)[0], obs, actions,
                                self.hparams.act_prior_fit_steps, self.hparams.act_prior_lr, batch_size)

    def _fit_frozen(self, net: torch.nn.Module, nll_fn: Callable[[Tensor, Tensor], Tensor], obs: Tensor,
                    actions: Tensor, steps: int, lr: float, batch_size: int) -> Tensor:
        """Adam on ``nll_fn(encoded obs, actions)`` over minibatches from the module's stream;
        ``net`` takes no gradients before or after."""
        obs = obs.to(self.device)
        actions = actions.to(self.device)
        net.requires_grad_(True)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        nll = torch.tensor(float("nan"))
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(0, obs.shape[0], (min(batch_size, obs.shape[0]),), device=obs.device,
                                    generator=self._rng())
                nll = nll_fn(self.encoder(obs[idx]), actions[idx])
                opt.zero_grad(set_to_none=True)
                nll.backward()
                opt.step()
        net.requires_grad_(False)
        return nll.detach()

    # ------------------------------------------------------------------ values
    def _q_and_value(self, net: QEnsemble, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Q at the data actions, soft values and mean Q over all/sampled actions, each ``(E, B)``."""
        obs = self.encoder(batch["obs"])
        if self.discrete:
            q_all = full_precision(net(obs))  # (E, B, A)
            index = batch["action"].long().view(1, -1, 1).expand(q_all.shape[0], -1, 1)
            return (q_all.gather(2, index).squeeze(2), losses.soft_value(q_all, self.hparams.temperature),
                    q_all.mean(2))
        samples, log_prop = self._sample_actions(obs)  # (B, M, A), (B, M)
        actions = torch.cat([batch["action"].unsqueeze(1), samples], dim=1)  # (B, 1+M, A)
        q = full_precision(net(obs, actions))  # (E, B, 1+M)
        if self.hparams.cql_value_with_data_action:
            log_data = self.proposal.log_prob(obs, batch["action"].unsqueeze(1))  # (B, 1)
            value = losses.sampled_soft_value(q, torch.cat([log_data, log_prop], 1), self.hparams.temperature)
        else:
            value = losses.sampled_soft_value(q[..., 1:], log_prop, self.hparams.temperature)
        return q[..., 0], value, q[..., 1:].mean(2)

    def _min_soft_value(self, net: QEnsemble, obs_raw: Tensor, segments: Sequence[int] | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
        """Soft value of the twins' pointwise minimum, ``(B,)``: the pessimistic target."""
        obs = self.encoder(obs_raw)
        if self.discrete:
            return losses.soft_value(full_precision(net(obs)).min(0).values, self.hparams.temperature)
        samples, log_prop = self._sample_actions(obs, segments, generator)
        q = full_precision(net(obs, samples)).min(0).values  # (B, M)
        return losses.sampled_soft_value(q, log_prop, self.hparams.temperature)

    def _min_q(self, batch: Batch, net: QEnsemble | None = None) -> Tensor:
        net = self.q_net if net is None else net
        obs = self.encoder(batch["obs"])
        if self.discrete:
            q = full_precision(net(obs)).min(0).values
            return q.gather(1, batch["action"].long().view(-1, 1)).squeeze(1)
        return full_precision(net(obs, batch["action"])).min(0).values

    # ------------------------------------------------------------------ objectives
    def target_soft_value(self, batch: Batch, segments: Sequence[int] | None = None) -> Tensor:
        """:math:`\\bar V(s')` of the twins' minimum under the target network, ``(B,)``."""
        with torch.no_grad():
            return self._min_soft_value(self.target_q_net, batch["next_obs"], segments)

    def q_objective(self, offline: Batch, expert: Batch,
                    next_value: Tensor | None = None) -> tuple[Tensor, losses.Metrics]:
        """Lower level: TD regression under the frozen reward plus the CQL penalty.

        ``next_value``: :meth:`target_soft_value` of ``offline`` if already computed this
        step. When ``expert is offline`` (D = D_E, one batch serving as both) the pairs
        are scored once: ``cql_data`` then makes no difference.
        """
        hp = self.hparams
        if next_value is None:
            next_value = self.target_soft_value(offline)
        with torch.no_grad():
            reward = full_precision(self.reward_net(offline["obs"], offline["action"]))
            target = losses.td_target(reward, next_value, offline["terminated"], hp.gamma)
        q_data, value, q_ood = self._q_and_value(self.q_net, offline)
        td, metrics = losses.q_loss(q_data, target)
        if hp.cql_data == "offline" or expert is offline:
            cql_value, cql_q, ood = value, q_data, q_ood
        else:
            e_q, e_value, e_ood = self._q_and_value(self.q_net, expert)
            if hp.cql_data == "expert":
                cql_value, cql_q, ood = e_value, e_q, e_ood
            else:
                cql_value = torch.cat([value, e_value], 1)
                cql_q = torch.cat([q_data, e_q], 1)
                ood = torch.cat([q_ood, e_ood], 1)
        cql, cql_metrics = losses.cql_penalty(cql_value, cql_q, self.cql_alpha())
        metrics.update(cql_metrics)
        metrics["cql/q_data"] = cql_q.detach().mean()
        metrics["cql/q_ood"] = ood.detach().mean()
        metrics["q/loss"] = (td + cql).detach()
        return td + cql, metrics

    def cql_alpha(self) -> float | Tensor:
        """The CQL coefficient: ``alpha``, or the dual variable's current value."""
        return self.hparams.alpha if self.hparams.cql_target_gap is None else self.log_alpha.exp()

    def _dual_step(self, gap: Tensor) -> losses.Metrics:
        """One dual step on ``log_alpha`` from this step's CQL gap, averaged over ranks first
        (every rank takes the same step and the buffers stay bit-identical)."""
        world_size, _ = self._world()
        gap = gap.detach().float().reshape(()).clone()
        if is_distributed(world_size):
            all_reduce_mean_([gap], world_size)
        with torch.enable_grad():
            log_alpha = self.log_alpha.detach().clone().requires_grad_(True)
            loss, metrics = losses.cql_alpha_dual_loss(log_alpha, gap, self.hparams.cql_target_gap)
            (grad,) = torch.autograd.grad(loss, log_alpha)
        with torch.no_grad():
            self.log_alpha.sub_(self.hparams.cql_alpha_lr * grad).clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        return metrics

    def _clip_spectral_norms(self, q: bool = True, reward: bool = True) -> None:
        hp = self.hparams
        if q and hp.spectral_norm:
            for net in (self.q_net, self.target_q_net):
                clip_spectral_norm_(net.hidden_weight_groups(), in_dim=-2)
        if reward and hp.reward_spectral_norm:
            clip_spectral_norm_(mlp_hidden_weight_groups(self.reward_net.net), in_dim=-1)

    def reward_pairs(self, offline: Batch, expert: Batch) -> tuple[Batch, tuple[int, int] | None]:
        """The pairs the reward is regressed on, and their parts' sizes (see ``reward_objective``)."""
        if self.hparams.reward_on_offline and expert is not offline:
            return _cat(expert, offline), (expert["obs"].shape[0], offline["obs"].shape[0])
        return expert, None

    def reward_objective(self, pairs: Batch, segments: Sequence[int] | None = None,
                         offline_next_value: Tensor | None = None) -> tuple[Tensor, losses.Metrics]:
        """Upper level: regress r_θ onto the soft advantage of the frozen Q (``advantage_net``),
        or onto Q itself with ``reward_target="q"``.

        ``segments``: local sizes of the parts ``pairs`` concatenates (expert, offline), so
        that proposal samples follow each part's global batch (see ``_sample_actions``).
        ``offline_next_value``: with ``advantage_net="target"``, the step's
        :meth:`target_soft_value` of the offline batch, reused for the pairs' offline part
        (all of ``pairs`` when ``segments`` is ``None`` and D = D_E).
        """
        net = self.q_net if self.hparams.advantage_net == "online" else self.target_q_net
        with torch.no_grad():
            q_data = self._min_q(pairs, net)
            if self.hparams.reward_target == "q":
                target = q_data
            elif net is self.q_net or offline_next_value is None:
                next_value = self._min_soft_value(net, pairs["next_obs"], segments)
            elif segments is None:
                next_value = offline_next_value
            else:
                n_expert = segments[0]
                expert_value = self._min_soft_value(net, pairs["next_obs"][:n_expert], segments[:1])
                next_value = torch.cat([expert_value, offline_next_value])
            if self.hparams.reward_target == "soft_advantage":
                target = losses.soft_advantage(q_data, next_value, pairs["terminated"], self.hparams.gamma)
        reward = full_precision(self.reward_net(pairs["obs"], pairs["action"]))
        loss, metrics = losses.reward_loss(reward, target)
        metrics["_reward/sq_mean"] = reward.detach().float().pow(2).mean()  # for the global std under DDP
        return loss, metrics

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> None:
        offline, expert = batch["offline"], batch["expert"]
        q_opt, r_opt = self.optimizers()
        metrics: losses.Metrics = {}

        # The target network moves only after the step (TargetNetworkUpdate), so its soft
        # values serve every Q update of the step, and the reward's with advantage_net="target".
        next_value = self.target_soft_value(offline)
        for _ in range(self.hparams.q_updates):
            self.toggle_optimizer(q_opt)
            loss, q_metrics = self.q_objective(offline, expert, next_value)
            self._update(q_opt, loss)
            self.untoggle_optimizer(q_opt)
            self._clip_spectral_norms(reward=False)
        metrics.update(q_metrics)
        if self.hparams.cql_target_gap is not None:
            # The gap of the last Q update's objective, taken with the alpha it used.
            metrics.update(self._dual_step(q_metrics["cql/gap"]))

        pairs, segments = self.reward_pairs(offline, expert)
        for _ in range(self.hparams.reward_updates):
            self.toggle_optimizer(r_opt)
            loss, r_metrics = self.reward_objective(pairs, segments, next_value)
            self._update(r_opt, loss)
            self.untoggle_optimizer(r_opt)
            self._clip_spectral_norms(q=False)
        metrics.update(r_metrics)

        self.updates += 1
        rate = self._updates_per_sec()
        if self.updates % (self.hparams.log_every_n_updates or self.trainer.log_every_n_steps) == 0:
            metrics["train/updates_per_sec"] = rate.to(self.device)
            metrics = self._mean_over_ranks(metrics)  # the same numbers on every rank
            metrics["train/updates"] = torch.tensor(float(self.updates))
            self.log_dict(metrics, on_step=True, on_epoch=False)
        else:
            metrics.pop("_reward/sq_mean", None)

    def validation_step(self, batch: dict[str, Batch], batch_idx: int) -> None:
        expert = batch["expert"]
        obs = self.encoder(expert["obs"])
        q_data = self._min_q(expert)
        if self.discrete:
            q_all = full_precision(self.q_net(obs)).min(0).values
            value = losses.soft_value(q_all, self.hparams.temperature)
            accuracy = (q_all.argmax(1) == expert["action"].long()).float().mean()
            self.log("val/expert_action_accuracy", accuracy, sync_dist=True)
        else:
            value = self._min_soft_value(self.q_net, expert["obs"], generator=self._eval_generator())
        # Every rank scores the same validation batch with the same weights: sync_dist
        # averages equal numbers (and keeps Lightning's epoch-level logging consistent).
        self.log("val/expert_nll", losses.expert_nll(value, q_data, self.hparams.temperature), prog_bar=True,
                 sync_dist=True)
        self.log("val/reward_mean", self.reward_net(expert["obs"], expert["action"]).mean(), sync_dist=True)

    # ------------------------------------------------------------------ acting
    @property
    def act_temperature(self) -> float:
        t = self.hparams.act_temperature
        return self.hparams.temperature if t is None else t

    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor, deterministic: bool = True) -> np.ndarray:
        """Action(s) of the Boltzmann policy :math:`\\pi(a|s)\\propto\\exp(Q(s,a)/T)` for raw observations
        (:math:`T` = ``act_temperature``, by default the training temperature).

        ``deterministic`` takes the argmax (Discrete) or the best of the candidates (Box:
        the behaviour density's mode and ``num_act_candidates`` draws, from the proposal or,
        with ``act_prior="clipped_gaussian"``, from that prior); otherwise actions are
        sampled, for Box by importance resampling of the candidates.
        """
        single_dims = 0 if self.spaces["obs_kind"] == "discrete" else 1
        obs_t = torch.as_tensor(np.asarray(obs) if not isinstance(obs, Tensor) else obs, device=self.device)
        single = obs_t.dim() == single_dims
        if single:
            obs_t = obs_t.unsqueeze(0)
        enc = self.encoder(obs_t)
        temperature = self.act_temperature
        if self.discrete:
            q = self.q_net(enc).min(0).values  # (B, A)
            action = q.argmax(1) if deterministic else torch.distributions.Categorical(logits=q / temperature).sample()
        else:
            # Greedy acting must be a function of the observation: fixed candidates.
            gen = torch.Generator(device=enc.device).manual_seed(0) if deterministic else None
            if self.hparams.act_policy == "boltzmann":
                mode = self.proposal.mode(enc).unsqueeze(1)  # (B, 1, A)
                cands, log_prop = self.proposal.sample(enc, self.hparams.num_act_candidates, generator=gen)  # (B, M, A)
                cands = torch.cat([mode, cands], 1)
                log_prop = torch.cat([self.proposal.log_prob(enc, mode), log_prop], 1)  # what drew them
                candidate_sets = [(cands, torch.zeros_like(log_prop), log_prop)]
            elif self.hparams.act_prior == "clipped_gaussian":
                if self.behavior_prior is None:
                    raise ValueError("act_prior='clipped_gaussian' needs the behaviour prior fitted before training; "
                                     "this model was built without it (set act_prior when building the model).")
                priors = [self.behavior_prior]
                if self.offline_prior is not None and bool(self.offline_prior_used):
                    # "expert_like": D's prior covers D_E's episodes and replaces D_E's prior.
                    if self.hparams.act_prior_data == "both":
                        priors.append(self.offline_prior)
                    else:
                        priors = [self.offline_prior]
                # u-space densities of the clipped Gaussian: prior and draw, the mode first. Drawn
                # lazily, so each prior's draws follow the previous prior's pick in the stream.
                candidate_sets = (prior.candidates(enc, self.hparams.num_act_candidates,
                                                   self.hparams.act_candidate_scale, generator=gen)
                                  for prior in priors)
            else:
                mode = self.proposal.mode(enc).unsqueeze(1)  # (B, 1, A)
                scale = self.hparams.act_candidate_scale
                cands, log_prop = self.proposal.sample_gaussian(enc, self.hparams.num_act_candidates, generator=gen,
                                                                std_scale=scale)
                cands = torch.cat([mode, cands], 1)
                log_mode = self.proposal.gaussian_log_prob(enc, mode, std_scale=scale)
                log_prop = torch.cat([log_mode, log_prop], 1)  # what drew them
                log_prior = self.proposal.log_prob(enc, cands)  # q(a|s), the mixture trained against
                candidate_sets = [(cands, log_prior, log_prop)]
            sets = iter(candidate_sets)
            action, q_action = self._tilted_pick(enc, *next(sets), temperature, deterministic)
            for cands, log_prior, log_prop in sets:
                # Generalised policy improvement: of the tilted priors' picks, the one with the higher Q.
                other, q_other = self._tilted_pick(enc, cands, log_prior, log_prop, temperature, deterministic)
                better = q_other > q_action
                action, q_action = torch.where(better.unsqueeze(1), other, action), torch.maximum(q_other, q_action)
        out = action.cpu().numpy()
        return out[0] if single else out

    def _tilted_pick(self, enc: Tensor, cands: Tensor, log_prior: Tensor, log_prop: Tensor, temperature: float,
                     deterministic: bool) -> tuple[Tensor, Tensor]:
        """The candidate ``(B, 1+M, A)`` picked by Q/T + log prior (greedy) or resampled with
        weights exp(Q/T)·prior/draw: the action ``(B, A)`` and its Q ``(B,)``."""
        q = self.q_net(enc, cands).min(0).values  # (B, 1+M)
        logits = q / temperature + log_prior if deterministic else q / temperature + log_prior - log_prop
        pick = logits.argmax(1) if deterministic else torch.distributions.Categorical(logits=logits).sample()
        rows = torch.arange(cands.shape[0], device=cands.device)
        return cands[rows, pick], q[rows, pick]

    # ------------------------------------------------------------------ checkpoints
