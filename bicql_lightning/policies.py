r"""Acting: how a controller draws actions from a learned Q.

No policy is optimised in BiCQL-ML's loop; a *policy* here is a rule that turns the trained
Q (and, for Box actions, a density of candidate actions) into actions. Every policy has one
method users call, ``act(obs, deterministic=True)``: batched, and each observation's action
is a function of that observation alone (greedy candidates come from one fixed set of
random numbers shared by every row, never from the batch's position).

* :class:`BoltzmannPolicy`: the paper's :math:`\pi(a|s)\propto\exp(Q(s,a)/T)`. Discrete:
  the argmax of Q (greedy) or a softmax draw. Box: over the mode of the training proposal
  and ``num_candidates`` draws from it; the best by Q (greedy) or importance resampling.
* :class:`TiltedPriorPolicy`, the default: :math:`\pi(a|s)\propto p(a|s)\exp(Q(s,a)/T)`
  with :math:`p` a clipped Gaussian fitted to the demonstrations (:func:`fit`), and, where
  the offline data holds more than them, refitted after training to D's transitions weighted
  by their soft advantage under Q (:func:`advantage_weights`), or to the episodes of D that
  the learned reward ranks as expert-like (:func:`expert_like_episodes`).
  Candidates are :math:`p`'s mode and draws from :math:`p`; greedy acting takes the best
  by :math:`Q/T + \log p`. On Discrete actions it acts as the Boltzmann policy.

A module holds its policy as a submodule (its fitted densities travel in checkpoints) and
chooses it with one argument, ``policy={"class_path": ..., "init_args": {...}}``
(:func:`make_policy`). The :class:`~bicql_lightning.FitPolicy` callback calls ``fit``
before training and ``refit`` after the last epoch.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from .densities import ActionProposal, GaussianPolicy, fit_density
from .networks import ObservationEncoder, QEnsemble
from .spaces import SpaceSpec

DEFAULT_POLICY = "bicql_lightning.TiltedPriorPolicy"
# Seed of the fixed candidate noise of greedy acting: part of what defines the controller.
GREEDY_NOISE_SEED = 0
# One in this many of D_E's pairs is held out when whole demonstrations choose their prior.
HELD_OUT = 5


class OfflineData(Protocol):
    """What a policy (and a model) may ask of its data: :class:`~bicql_lightning.OfflineIRLDataModule`
    provides it. ``which`` is ``"expert"`` (D_E) or ``"offline"`` (D)."""

    @property
    def offline_is_expert(self) -> bool: ...  # D is D_E: one set of transitions

    def num_transitions(self, which: str) -> int: ...

    def pairs(self, which: str, index: Tensor | slice = slice(None)) -> tuple[Tensor, Tensor]: ...

    def episodes(self, which: str) -> Tensor: ...  # episode id (int) of each transition

    def consecutive_share(self, which: str) -> float: ...  # transitions their successor follows in the set


def batch_observations(obs: np.ndarray | Tensor, obs_kind: str, device: torch.device) -> tuple[Tensor, bool]:
    """Raw observation(s) as a batched tensor on ``device``, and whether one came unbatched."""
    single_dims = 0 if obs_kind == "discrete" else 1
    obs_t = torch.as_tensor(np.asarray(obs) if not isinstance(obs, Tensor) else obs, device=device)
    single = obs_t.dim() == single_dims
    return (obs_t.unsqueeze(0) if single else obs_t), single


def expert_like_episodes(reward: Tensor, episode: Tensor, expert_level: Tensor | float, fraction: float,
                         demonstration: Tensor | None = None) -> Tensor:
    r"""Which transitions ``(N,)`` of D belong to episodes the learned reward ranks as expert-like.

    An episode is kept when its mean learned reward per transition :math:`\bar r_k` reaches
    :math:`\bar r_D + f(\bar r_E - \bar r_D)`, with :math:`\bar r_D` the mean over D's
    transitions, :math:`\bar r_E` = ``expert_level`` (the mean over D_E's) and :math:`f` =
    ``fraction``. A per-transition mean, so that episodes of any length compare. The
    logged episode with the highest mean is always kept, and so are D_E's own transitions
    (``demonstration``, ``(N,)`` bool, where D holds them): ranking them with the logged
    episodes would let a subsampled demonstration, one short episode of expert pairs, be
    the only one kept, and the refit would clone its few pairs (hopper sub20 seed 1: 3.1).
    ``reward`` ``(N,)``, ``episode`` ``(N,)`` integer ids.
    """
    reward = reward.double()
    episode = episode.long().to(reward.device)
    num = int(episode.max()) + 1
    sums = torch.zeros(num, dtype=torch.float64, device=reward.device).index_add_(0, episode, reward)
    counts = torch.bincount(episode, minlength=num)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, -torch.inf))  # (K,)
    level = reward.mean()
    keep = means >= level + fraction * (torch.as_tensor(expert_level, dtype=torch.float64) - level)
    logged = counts > 0
    if demonstration is not None:
        demonstration = demonstration.to(reward.device)
        logged[episode[demonstration]] = False
    keep[(means.masked_fill(~logged, -torch.inf) if logged.any() else means).argmax()] = True
    kept = keep[episode]
    return kept if demonstration is None else kept | demonstration


def advantage_weights(advantage: Tensor, scale: float = 1.0, clip: float = 5.0) -> Tensor:
    r"""Weights ``(N,)`` of D's transitions for the prior's refit from their soft advantages
    :math:`A = Q(s,a) - V(s)`: :math:`\exp(\min(z / c, \text{clip}))` with :math:`z` the
    advantage standardised over D and :math:`c` = ``scale``.

    Advantage-weighted regression (Peng et al. 2019) with the temperature set by the data:
    :math:`\beta = c\cdot\mathrm{std}(A)`, so one setting serves tasks whose Q values have
    any scale. Every transition keeps some weight, so the prior stays as broad as D where
    Q cannot tell its actions apart (hopper with medium data: ``bench/NOTES.md``), and
    concentrates on the actions Q ranks far above the rest where it can. The clip (at
    :math:`e^5` times a typical weight) keeps a few outliers from taking the whole fit.
    """
    adv = advantage.double()
    z = (adv - adv.mean()) / (scale * adv.std().clamp_min(1e-12))
    return torch.exp(z.clamp(max=clip))


class QPolicy(nn.Module):
    """A controller read off a Q ensemble: the base of every acting rule of BiCQL-ML.

    Built by the module that owns it (:meth:`build`), which hands over its Q networks, its
    observation encoder and, for Box actions, its training proposal. Those are referenced,
    not owned: they stay the module's parameters (and checkpoint entries); the policy owns
    only what it fits itself. ``revision`` counts refits, so an evaluation can tell that the
    controller changed although the weights of Q did not.
    """

    def __init__(self, temperature: float | None = None, num_candidates: int = 64):
        super().__init__()
        if temperature is not None and temperature <= 0:
            raise ValueError(f"policy temperature must be positive (or null: the training temperature), got "
                             f"{temperature}")
        if num_candidates < 1:
            raise ValueError(f"policy num_candidates must be at least 1, got {num_candidates}")
        self.temperature = temperature
        self.num_candidates = num_candidates
        self.revision = 0
        self._refs: tuple[QEnsemble, ObservationEncoder, ActionProposal | None] | None = None

    @classmethod
    def config(cls, **init_args: Any) -> dict[str, Any]:
        """The ``policy`` argument naming this class: ``BiCQLML(policy=BoltzmannPolicy.config(temperature=2))``."""
        return {"class_path": f"bicql_lightning.{cls.__name__}" if cls.__module__.startswith("bicql_lightning")
                else f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}

    def build(self, spaces: SpaceSpec, q_net: QEnsemble, encoder: ObservationEncoder,
              proposal: ActionProposal | None, training_temperature: float) -> None:
        self.spaces = spaces
        self.discrete = spaces["action_kind"] == "discrete"
        self._refs = (q_net, encoder, proposal)
        if self.temperature is None:
            self.temperature = float(training_temperature)

    @property
    def q_net(self) -> QEnsemble:
        return self._built()[0]

    @property
    def encoder(self) -> ObservationEncoder:
        return self._built()[1]

    @property
    def proposal(self) -> ActionProposal | None:
        return self._built()[2]

    def _built(self):
        if self._refs is None:
            raise RuntimeError(f"{type(self).__name__} acts once a model has built it (model.policy)")
        return self._refs

    # ------------------------------------------------------------------ what users call
    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor, deterministic: bool = True) -> np.ndarray:
        """Action(s) for raw observation(s), one or a batch: greedy (``deterministic``) or drawn."""
        device = next(self.q_net.parameters()).device
        obs_t, single = batch_observations(obs, self.spaces["obs_kind"], device)
        out = self.actions(self.encoder(obs_t), deterministic).cpu().numpy()
        return out[0] if single else out

    def actions(self, enc: Tensor, deterministic: bool) -> Tensor:
        """Actions ``(B, ...)`` for encoded observations ``(B, D)``."""
        q_all = self.q_net(enc).min(0).values  # Discrete: (B, A)
        if deterministic:
            return q_all.argmax(1)
        return torch.distributions.Categorical(logits=q_all / self.temperature).sample()

    @torch.no_grad()
    def log_prob(self, enc: Tensor, actions: Tensor) -> Tensor:
        """:math:`\\log\\pi(a|s)` of the rule ``act(obs, deterministic=False)`` draws from, ``(B,)``
        for encoded observations ``(B, D)`` and actions ``(B, ...)``. Discrete: the softmax of
        :math:`Q/T`, exactly."""
        if not self.discrete:
            raise NotImplementedError(f"{type(self).__name__} has no log_prob for Box actions")
        logits = self.q_net(enc).min(0).values.float() / self.temperature  # (B, A)
        return logits.log_softmax(1).gather(1, actions.long().reshape(-1, 1)).squeeze(1)

    def _log_partition(self, enc: Tensor, draws: Tensor, log_weight: Tensor | None = None) -> Tensor:
        """:math:`\\log\\frac1K\\sum_k \\exp(Q(s,c_k)/T)\\,w(c_k)`, the normaliser of the acting density
        estimated from draws ``(B, K, A)``: ``log_weight`` ``(B, K)`` is :math:`-\\log q` for draws from a
        proposal :math:`q` (a density over the box), none for a prior's own draws (a tilt of the prior)."""
        q = self.q_net(enc, draws).min(0).values.float() / self.temperature
        if log_weight is not None:
            q = q + log_weight
        return torch.logsumexp(q, 1) - math.log(draws.shape[1])

    # ------------------------------------------------------------------ fitting (FitPolicy)
    @property
    def needs_fit(self) -> bool:
        """Whether :meth:`fit` has work left (a fresh policy; never after a checkpoint that holds it)."""
        return False

    def fit(self, data: OfflineData, generator: torch.Generator) -> None:
        """Fit what the policy needs from data, before training."""

    def refit(self, data: OfflineData, reward: Any, generator: torch.Generator,
              advantage: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, float]:
        """Refit after training with the final learned ``reward(obs, actions) -> (N,)`` and the
        final soft ``advantage(obs, actions) -> (N,)``; returns metrics to log. Increments
        ``revision`` when the controller changed."""
        return {}

    # ------------------------------------------------------------------ candidates
    def _noise(self, rows: int, shape: tuple[int, ...], deterministic: bool, device: torch.device) -> Tensor:
        """Standard normals ``(1 or rows, *shape)``: one fixed set shared by every state when greedy."""
        if deterministic:
            gen = torch.Generator(device=device).manual_seed(GREEDY_NOISE_SEED)
            return torch.randn((1, *shape), generator=gen, device=device)
        return torch.randn((rows, *shape), device=device)

    def _pick(self, enc: Tensor, cands: Tensor, log_prior: Tensor, log_draw: Tensor,
              deterministic: bool) -> Tensor:
        """The candidate ``(B, 1+K, A)`` with the highest :math:`Q/T + \\log` prior (greedy), or one
        resampled with weights :math:`\\exp(Q/T)\\,\\text{prior}/\\text{draw}`: ``(B, A)``."""
        q = self.q_net(enc, cands).min(0).values  # (B, 1+K)
        logits = q / self.temperature + log_prior
        if deterministic:
            pick = logits.argmax(1)
        else:
            pick = torch.distributions.Categorical(logits=logits - log_draw).sample()
        return cands[torch.arange(cands.shape[0], device=cands.device), pick]


class BoltzmannPolicy(QPolicy):
    r"""The paper's policy :math:`\pi(a|s)\propto\exp(Q(s,a)/T)`.

    Args:
        temperature: :math:`T`; ``None`` is the training temperature (the paper's choice).
        num_candidates: Box actions: draws from the training proposal per state, besides its mode.

    For Box actions the candidates are the proposal's mode and ``num_candidates`` draws from
    it; greedy acting plays the best by Q, sampling resamples them by :math:`\exp(Q/T)/q`.
    On hopper this scores about 10 normalised where :class:`TiltedPriorPolicy` scores 95-100
    (``docs/benchmark.md``): the importance-sampled soft value rarely visits actions the
    proposal makes unlikely, so training rarely pushes Q down there and Q overrates them.
    """

    def __init__(self, temperature: float | None = None, num_candidates: int = 64):
        super().__init__(temperature, num_candidates)

    def actions(self, enc: Tensor, deterministic: bool) -> Tensor:
        if self.discrete:
            return super().actions(enc, deterministic)
        proposal = self.proposal
        # Greedy: one fixed set of numbers for every state (rows broadcast), as _noise.
        gen = torch.Generator(device=enc.device).manual_seed(GREEDY_NOISE_SEED) if deterministic else None
        noise = proposal.draw_noise(1 if deterministic else enc.shape[0], self.num_candidates, gen, enc.device)
        draws, log_draw = proposal.sample(enc, self.num_candidates, noise=noise)
        mode = proposal.mode(enc).unsqueeze(1)
        cands = torch.cat([mode, draws], 1)
        log_draw = torch.cat([proposal.log_prob(enc, mode), log_draw], 1)  # what drew them
        return self._pick(enc, cands, torch.zeros_like(log_draw), log_draw, deterministic)

    @torch.no_grad()
    def log_prob(self, enc: Tensor, actions: Tensor) -> Tensor:
        """Box: :math:`Q(s,a)/T - \\log Z(s)`, a density over the box, with
        :math:`Z = E_q[\\exp(Q/T)/q]` over the proposal's fixed greedy draws."""
        if self.discrete:
            return super().log_prob(enc, actions)
        proposal = self.proposal
        gen = torch.Generator(device=enc.device).manual_seed(GREEDY_NOISE_SEED)
        draws, log_q = proposal.sample(enc, self.num_candidates,
                                       noise=proposal.draw_noise(1, self.num_candidates, gen, enc.device))
        q = self.q_net(enc, actions.reshape(actions.shape[0], -1).float()).min(0).values.float()
        return q / self.temperature - self._log_partition(enc, draws, -log_q.float())


class TiltedPriorPolicy(QPolicy):
    r"""The default controller: a clipped-Gaussian prior of the demonstrations, tilted by Q.

    :math:`\pi(a|s)\propto p(a|s)\exp(Q(s,a)/T)`: greedy acting plays the best of the
    prior's mode and ``num_candidates`` draws from it by :math:`Q/T + \log p` (the
    KL-regularised improvement of :math:`p` with coefficient :math:`T`); sampling resamples
    them by :math:`\exp(Q/T)`. :math:`p` is :class:`~bicql_lightning.densities.GaussianPolicy`
    with ``"clipped"`` draws (how the benchmark's experts act), fitted by exact censored
    maximum likelihood to D_E before training and frozen.

    Args:
        temperature: :math:`T` of acting. Tuned on hopper alone (held-out episodes, six
            trained cells, ``bench/NOTES.md``): 4 scored above 1, 2, 3 and 8.
        num_candidates: draws from the prior per state, besides its mode.
        hidden_sizes: hidden widths of the prior's network.
        fit_steps: maximum-likelihood (Adam) steps of each fit of the prior.
        lr: learning rate of those fits.
        fit_schedule: the learning rate over each fit: ``"constant"`` (the default) or
            ``"cosine"``, annealed to 0 over ``fit_steps`` (IQL's actor does this), so the
            prior kept does not depend on the last few minibatches. Not the default: on
            walker2d, where the score over draws of the fit spreads by 40 points on one Q,
            annealing does not narrow it, and on hopper it is no better (``bench/NOTES.md``).
        relabel: whether, where D holds more than D_E, the prior is refitted after training
            to D as the trained loop labels it, and acting uses that one: the learned reward
            and Q label logged data cloning cannot (halfcheetah with mixed data: BC on all of
            D 6). ``"auto"`` (the default) refits only where D_E's demonstrations are sparse:
            less than half of D_E's transitions are followed by their successor
            (:meth:`~bicql_lightning.OfflineIRLDataModule.consecutive_share`; 0 after
            ``expert_subsample``). Whole demonstrations are cloned well by D_E's own prior,
            and beside a larger D of another behaviour the refit follows D instead (one
            hopper demonstration beside medium data: the refit 20, D_E's prior tilted by Q
            98.8, ``bench/NOTES.md``). ``"heldout"`` refits sparse demonstrations too, and
            whole ones where the refit predicts a held-out fifth of D_E's actions better than
            D_E's own prior does (:meth:`heldout_errors`): it keeps D_E's prior beside medium
            data, and on hopper, the tuning task, it barely moves the score. It is not the
            default: its lift of walker2d with mixed data (56.8 to 83.4 on one draw per seed)
            and its costs on ant and halfcheetah did not hold over fresh draws of the fit
            (walker2d 60.4 over nine, D_E's prior 57.7; ``bench/NOTES.md``). ``True``
            always refits, ``False`` never does.
        relabel_weights: how D's transitions are weighted in that refit. ``"advantage"``
            (the default): every transition, by :func:`advantage_weights` of its soft
            advantage under the final Q, an advantage-weighted fit. ``"episodes"``: only the
            episodes the final learned reward ranks as expert-like
            (:func:`expert_like_episodes`), the rule before; it keeps a tenth of hopper's
            medium data and scores 12.3 there (3 seeds) where the weighted fit kept BC-all's
            breadth (``bench/NOTES.md``).
        advantage_scale: :math:`c` of :func:`advantage_weights` (tuned on hopper: 1 above 0.5).
        expert_like_fraction: :math:`f` of :func:`expert_like_episodes` (``relabel_weights:
            episodes``): an episode is kept when its mean learned reward per transition
            reaches :math:`\bar r_D + f(\bar r_E - \bar r_D)`.
        tilt_after_refit: whether Q tilts the prior again after an advantage-weighted refit.
            Off (the default): that prior already is D's behaviour improved by Q, AWR's
            :math:`p_D(a|s)\exp(A/\beta)` fitted on D's own actions, so acting plays its mode
            (greedy) or its draws (sampling); a second tilt would score its candidates by Q
            off D's actions, where Q is least trusted (ant with mixed data: 53.6 tilted, 84.9
            at the mode; hopper, the tuning task, ties, ``bench/NOTES.md``). Acting from
            D_E's prior, or after ``relabel_weights: episodes``, is always tilted.

    Discrete actions have no prior: the policy is then the Boltzmann policy of Q.
    """

    def __init__(self, temperature: float | None = 4.0, num_candidates: int = 64,
                 hidden_sizes: list[int] = [256, 256],  # noqa: B006 - jsonargparse needs a literal
                 fit_steps: int = 20000, lr: float = 3e-4, relabel: bool | Literal["auto", "heldout"] = "auto",
                 relabel_weights: Literal["advantage", "episodes"] = "advantage", advantage_scale: float = 1.0,
                 expert_like_fraction: float = 0.5, tilt_after_refit: bool = False,
                 fit_schedule: Literal["constant", "cosine"] = "constant"):
        super().__init__(temperature, num_candidates)
        if fit_schedule not in ("constant", "cosine"):
            raise ValueError(f"policy fit_schedule must be 'constant' or 'cosine', got {fit_schedule!r}")
        self.fit_schedule = fit_schedule
        if fit_steps < 1:
            raise ValueError(f"policy fit_steps must be at least 1, got {fit_steps}")
        if not np.isfinite(expert_like_fraction):
            raise ValueError(f"policy expert_like_fraction must be a finite number, got {expert_like_fraction}")
        self.hidden_sizes = list(hidden_sizes)
        self.fit_steps, self.lr = fit_steps, lr
        if relabel_weights not in ("advantage", "episodes"):
            raise ValueError(f"policy relabel_weights must be 'advantage' or 'episodes', got {relabel_weights!r}")
        if not (np.isfinite(advantage_scale) and advantage_scale > 0):
            raise ValueError(f"policy advantage_scale must be a positive number, got {advantage_scale}")
        if relabel not in (True, False, "auto", "heldout"):
            raise ValueError(f"policy relabel must be 'auto', 'heldout', true or false, got {relabel!r}")
        self.relabel = relabel if relabel in ("auto", "heldout") else bool(relabel)
        self.expert_like_fraction = expert_like_fraction
        self.relabel_weights, self.advantage_scale = relabel_weights, advantage_scale
        self.tilt_after_refit = bool(tilt_after_refit)

    def build(self, spaces: SpaceSpec, q_net: QEnsemble, encoder: ObservationEncoder,
              proposal: ActionProposal | None, training_temperature: float) -> None:
        super().build(spaces, q_net, encoder, proposal, training_temperature)
        if self.discrete:
            return
        self.prior = GaussianPolicy(spaces, self.hidden_sizes, "clipped").requires_grad_(False)
        # D's expert-like episodes' prior: a network of its own, initialised now, fitted by refit.
        self.relabeled_prior = GaussianPolicy(spaces, self.hidden_sizes, "clipped").requires_grad_(False)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("relabeled", torch.zeros((), dtype=torch.bool))

    @property
    def acting_prior(self) -> GaussianPolicy:
        """The density acting tilts: D_E's fit, or after a refit that of D's expert-like episodes."""
        return self.relabeled_prior if bool(self.relabeled) else self.prior

    def actions(self, enc: Tensor, deterministic: bool) -> Tensor:
        if self.discrete:
            return super().actions(enc, deterministic)
        prior = self.acting_prior
        if self.acts_untilted:
            return prior.mode(enc) if deterministic else prior.sample(enc)
        noise = self._noise(enc.shape[0], (self.num_candidates, prior.act_dim), deterministic, enc.device)
        cands, log_prior = prior.candidates(enc, noise)
        # Drawn from the prior itself (the mode too, as a point of u-space): prior / draw = 1.
        return self._pick(enc, cands, log_prior, log_prior, deterministic)

    @torch.no_grad()
    def log_prob(self, enc: Tensor, actions: Tensor) -> Tensor:
        """Box: the acting prior's :math:`\\log p(a|s)` (exact, its censored density on the
        box's faces), plus :math:`Q(s,a)/T - \\log E_p[\\exp(Q/T)]` over its fixed greedy draws
        where acting tilts it."""
        if self.discrete:
            return super().log_prob(enc, actions)
        prior = self.acting_prior
        actions = actions.reshape(actions.shape[0], -1).float()
        log_p = prior.log_prob(enc, actions)
        if self.acts_untilted:
            return log_p
        noise = self._noise(enc.shape[0], (self.num_candidates, prior.act_dim), True, enc.device)
        draws = prior.candidates(enc, noise)[0][:, 1:]  # the draws, without the mode
        q = self.q_net(enc, actions).min(0).values.float()
        return log_p + q / self.temperature - self._log_partition(enc, draws)

    @property
    def acts_untilted(self) -> bool:
        """Whether acting plays the advantage-weighted refit's prior as it is (``tilt_after_refit`` off)."""
        return bool(self.relabeled) and self.relabel_weights == "advantage" and not self.tilt_after_refit

    @property
    def needs_fit(self) -> bool:
        return not self.discrete and not bool(self.fitted)

    def _fit(self, prior: GaussianPolicy, obs: Tensor, actions: Tensor, generator: torch.Generator,
             weights: Tensor | None = None) -> None:
        fit_density(prior, lambda o, a: prior.loss(o, a)[0], self.encoder, obs, actions, self.fit_steps,
                    self.lr, generator, weights=weights, schedule=self.fit_schedule)

    def fit(self, data: OfflineData, generator: torch.Generator) -> None:
        if not self.needs_fit:
            return
        self._fit(self.prior, *data.pairs("expert"), generator)
        self.fitted.fill_(True)

    def refits(self, data: OfflineData) -> bool:
        """Whether :meth:`refit` replaces D_E's prior with a fit to D without asking held-out
        pairs (``relabel``): sparse demonstrations, or ``relabel: true``; whole demonstrations
        keep D_E's prior under ``"auto"`` and ask under ``"heldout"``."""
        if self.discrete or self.relabel is False or data.offline_is_expert:
            return False
        return self.relabel is True or data.consecutive_share("expert") < 0.5

    def refit(self, data: OfflineData, reward: Any, generator: torch.Generator,
              advantage: Callable[[Tensor, Tensor], Tensor] | None = None) -> dict[str, float]:
        if self.discrete or self.relabel is False or data.offline_is_expert:
            return {}  # D is D_E: D_E's prior is already that fit
        if self.relabel == "auto" and not self.refits(data):
            return {"policy/relabeled_share": 0.0}  # whole demonstrations: D_E's prior acts
        chunk = 1 << 14

        def rewards(which: str, score: Any = reward) -> Tensor:
            n = data.num_transitions(which)
            return torch.cat([score(*data.pairs(which, slice(i, i + chunk))) for i in range(0, n, chunk)])

        if self.relabel_weights == "advantage":
            if advantage is None:
                raise ValueError("relabel_weights='advantage' needs the module's soft advantages: refit through "
                                 "FitPolicy (or pass advantage=), or set relabel_weights: episodes")
            weights = advantage_weights(rewards("offline", advantage), self.advantage_scale)
        else:
            demonstration = data.expert_in_offline() if hasattr(data, "expert_in_offline") else None
            weights = expert_like_episodes(rewards("offline"), data.episodes("offline"),
                                           rewards("expert").double().mean(), self.expert_like_fraction,
                                           demonstration).double()
        metrics = {}
        if not self.refits(data):  # whole demonstrations under "heldout": the refit must earn its place
            metrics = self.heldout_errors(data, weights, generator)
            if not metrics or metrics["policy/heldout_error_refit"] >= metrics["policy/heldout_error_expert"]:
                return {"policy/relabeled_share": 0.0, **metrics}  # D_E's prior acts
        if self.relabel_weights == "advantage":
            self._fit(self.relabeled_prior, *data.pairs("offline"), generator, weights)
            self.relabeled.fill_(True)
            self.revision += 1
            # The effective sample size, as a share of D: how much of D the fit draws on.
            share = float(weights.sum() ** 2 / weights.pow(2).sum() / weights.numel())
            return {"policy/relabeled_share": share, **metrics}

        index = weights.nonzero().squeeze(1)  # only the kept pairs are gathered
        self._fit(self.relabeled_prior, *data.pairs("offline", index), generator)
        self.relabeled.fill_(True)
        self.revision += 1
        return {"policy/relabeled_share": float((weights > 0).float().mean()), **metrics}

    def heldout_errors(self, data: OfflineData, weights: Tensor, generator: torch.Generator) -> dict[str, float]:
        r"""Which prior predicts the demonstrator better: the mean squared error of the mode on
        a fifth of D_E's pairs held out, of D_E's prior fitted on the rest and of the refit to
        D (``weights``, ``(|D|,)``) without D's copies of them, both from the refit's own
        initialisation. ``{}`` where that cannot be asked (fewer than :data:`HELD_OUT` pairs,
        or data that cannot say which of D's pairs are D_E's).

        Log-likelihood cannot choose (a prior fitted on a few hundred pairs is overconfident
        off them: it always prefers the refit); the mode is what greedy acting plays. The
        draws come from a copy of ``generator``: choosing leaves the stream, and so the refit
        it picks, as ``relabel: true`` gives them."""
        n = data.num_transitions("expert")
        if n < HELD_OUT or not hasattr(data, "expert_in_offline"):
            return {}
        copies = data.expert_in_offline().nonzero().squeeze(1)  # D_E's pairs, in D_E's order
        if len(copies) != n:
            return {}
        stream = torch.Generator(device=generator.device)
        stream.set_state(generator.get_state())
        held = torch.zeros(n, dtype=torch.bool)
        held[torch.randperm(n, generator=stream, device=generator.device)[: n // HELD_OUT].cpu()] = True
        obs_e, act_e = data.pairs("expert")
        weights = weights.clone()
        weights[copies[held]] = 0.0
        errors = {}
        for name, (obs, actions, w) in {"expert": (obs_e[~held], act_e[~held], None),
                                        "refit": (*data.pairs("offline"), weights)}.items():
            net = copy.deepcopy(self.relabeled_prior)
            self._fit(net, obs, actions, stream, w)
            with torch.no_grad():
                device = next(net.parameters()).device
                mode = net.mode(self.encoder(obs_e[held].to(device)))
                errors[f"policy/heldout_error_{name}"] = float((mode - act_e[held].to(device)).pow(2).mean())
        return errors


def make_policy(spec: dict[str, Any] | None) -> QPolicy:
    """The policy a ``policy`` argument names: ``None`` or a dict without ``class_path`` is
    :class:`TiltedPriorPolicy`; ``class_path`` is a class name of this package or a full import path."""
    spec = {} if spec is None else dict(spec)
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"policy takes 'class_path' and 'init_args', not {sorted(unknown)} "
                         "(e.g. policy: {class_path: BoltzmannPolicy, init_args: {temperature: 1.0}})")
    path = spec.get("class_path") or DEFAULT_POLICY
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "bicql_lightning"), name)
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, QPolicy)):
        raise ValueError(f"policy class_path {path!r} is not a policy; use BoltzmannPolicy, TiltedPriorPolicy "
                         "or the import path of a QPolicy subclass")
    init_args = dict(spec.get("init_args") or {})
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    wrong = sorted(set(init_args) - set(accepted))
    if wrong:
        raise ValueError(f"{cls.__name__} has no argument {', '.join(map(repr, wrong))}; it takes {', '.join(accepted)}")
    return cls(**init_args)
