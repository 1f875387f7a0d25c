r"""BiCQL-ML as a LightningModule: conservative Q-learning and soft-advantage reward
regression, alternated with manual optimisation.

One ``training_step`` (one *update* in this package's counters):

1. ``q_updates`` times, reward frozen, on the offline batch from :math:`D`:
   :math:`L_Q = \sum_i (Q_i(s,a) - y)^2 + \alpha\sum_i \mathbb E_P[V_i(s) - Q_i(s,a)]`,
   :math:`y = r_\theta(s,a) + \gamma(1-\text{terminated})\bar V(s')`;
2. ``reward_updates`` times, Q frozen, on the expert batch from :math:`D_E`:
   :math:`L_R = (r_\theta(s,a) - [Q(s,a) - \gamma(1-\text{terminated})V(s')])^2`.

No policy is optimised. For Box actions the soft value is the importance-sampled estimate
of :func:`~bicql_lightning.losses.sampled_soft_value` under a fixed proposal fitted to data
before training. Acting is the module's ``policy`` (:mod:`bicql_lightning.policies`): by
default Q tilting a clipped Gaussian fitted to the demonstrations.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from . import losses
from .base import OfflineModule, check_common_hparams
from .captured import CapturedIteration
from .densities import ActionProposal, fit_density
from .distributed import all_reduce_mean_, broadcast_, full_precision, is_distributed
from .networks import QEnsemble, polyak_update
from .policies import make_policy
from .reward import CHECKPOINT_KEY, RewardNet
from .spaces import SpaceSpec, check_spec

Batch = dict[str, Tensor]
# Offset of the bounded reward per meaning of termination, in units of reward_bound.
TERMINATION_OFFSET = {"failure": 1.0, "success": -1.0, "neutral": 0.0}
TERMINATIONS = ("auto", *TERMINATION_OFFSET)


def resolve_termination(expert_terminations: int, offline_terminations: int) -> str:
    """``termination="auto"``: failure when only D ends episodes by termination, else neutral.

    An expert that terminates may be reaching a goal or may have fallen once; either way
    the data do not say that ending is bad, so the loop keeps the symmetric range.
    """
    return "failure" if expert_terminations == 0 and offline_terminations > 0 else "neutral"


def _cat(a: Batch, b: Batch) -> Batch:
    return {k: torch.cat([a[k], b[k]]) for k in a}


class BiCQLML(OfflineModule):
    r"""Offline inverse RL by bi-level conservative Q-learning and maximum likelihood.

    The defaults are the settings the MuJoCo benchmark measures (``docs/benchmark.md``).

    Args:
        spaces: observation/action spaces as a :class:`SpaceSpec` dict. Left ``None``,
            it is taken from the data module at ``setup`` (the CLI links it).
        hidden_sizes: hidden widths of each twin Q network.
        reward_hidden_sizes: hidden widths of the reward network.
        gamma: discount :math:`\gamma`.
        temperature: Boltzmann temperature :math:`T` of the soft value.
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
        termination: what ending an episode (a terminal transition) means, which places
            the bounded reward's range: ``"failure"`` shifts it to :math:`[0, 2b]`, so no
            learned reward makes ending an episode early pay (falling, in locomotion);
            ``"success"`` to :math:`[-2b, 0]`, so reaching the end sooner is better (goal
            tasks); ``"neutral"`` keeps :math:`[-b, b]`. The expert's likelihood cannot set
            this level where D_E never terminates: a constant per step is invisible to it
            yet adds (episode length) x constant to every return of D. ``"auto"``: failure
            when D has terminal transitions and D_E none (its episodes end by time limit),
            otherwise neutral. Needs ``reward_bound > 0`` unless neutral.
        reward_level: what sets the reward's level, a constant per step that the expert's
            likelihood cannot see: ``"free"`` regresses :math:`r_\theta` onto the soft
            advantage itself (the paper's), so the level drifts wherever the loop's biases
            push it (on walker2d, to the floor of its bounded range); ``"anchored"``
            regresses it onto the soft advantage up to a constant
            (:func:`~bicql_lightning.losses.level_anchored_target`), so the level stays where
            the network starts, the middle of the bounded range, and only differences
            between pairs are learned; ``"data"`` regresses it onto the soft advantage up
            to a constant that holds the reward's mean over D's pairs at ``offline_reward_level``
            (:func:`~bicql_lightning.losses.level_pinned_target`), so D's average step pays
            little and the expert's pairs sit above it by their advantage. Needs
            ``reward_on_offline``.
        offline_reward_level: with ``reward_level="data"``, where D's mean reward is held, in
            units of ``reward_bound`` above the bounded range's floor when termination means
            failure or success (a step no better than D's average is worth little more than
            ending), and from the range's centre when it is neutral (the level then changes
            no policy).
        terminal_reward: the reward's target on D's terminal pairs when termination means
            failure or success. There the soft advantage is :math:`Q(s,a)` and Q's TD target
            is :math:`r_\theta(s,a)`: the two only chase each other, and the conservative
            term's push on D's pairs carries both up (hopper: the step that falls learns
            9.4 of the ceiling 10, so falling pays). ``"advantage"`` keeps the soft advantage
            (the paper's); ``"zero"`` regresses those pairs onto 0, the end of the bounded
            range that borders termination (the failure range's floor, the success range's
            ceiling) and the absorbing state's value. Neutral termination keeps the advantage.
            Opt-in: under the default free level those pairs already sit at the floor.
        reward_on_offline: also regress the reward onto the soft advantage on the offline
            pairs, so :math:`r_\theta` is fitted wherever Q-learning bootstraps through it.
            Off (the paper's: D_E's pairs only), the reward extrapolates to D and on hopper
            with mixed data pays random actions most (``bench/NOTES.md``).
        advantage_net: the Q network whose soft advantage the reward is regressed onto:
            ``"online"`` (the paper's :math:`Q` right after its update), ``"target"``
            (the Polyak-averaged :math:`\bar Q` of the TD targets: a two-timescale loop whose
            soft values :math:`\bar V(s')` are those of the step's TD targets, one sampled
            soft value less per update) or ``"residual"`` (the twins' mean of the online
            :math:`Q` at the pair, less :math:`\gamma\bar V(s')` of the step's TD targets: on
            D's pairs the target is then :math:`r_\theta` plus the Q update's own residual,
            without the lag of a Polyak copy behind a rising Q or the twins' minimum; on
            hopper beside medium data that lag inverts the reward's order on D's pairs,
            which ``residual`` undoes, but it costs halfcheetah's: ``bench/NOTES.md``).
        cql_value_with_data_action: Box actions: the conservative term's :math:`V(s)` is
            estimated from the data action and the M proposal samples together (each
            weighted by :math:`1/q`), as the positive sits in InfoNCE's partition: once Q
            ranks the data action above the samples the term stops pushing (hopper N = 1:
            85.3 against 57.8 without).
        num_action_samples: ``M``, proposal samples per state for the Box soft value.
        cql_gradient_samples: Box actions: ``None`` backpropagates the conservative term's
            soft value :math:`V(s)` through all M proposal samples; ``k`` backpropagates it
            through ``k`` of them per state, drawn by their weight in :math:`V`'s gradient
            and reweighted (:func:`~bicql_lightning.losses.value_surrogate`): the value is the
            same, its gradient an unbiased estimate, and the Q update's backward pass runs
            over 1 + k actions per state instead of 1 + M. A speed lever for CPUs, where the
            update is bound by arithmetic (``bench.throughput --also cql_gradient_samples=1``).
        policy: the controller ``act`` uses, as ``{"class_path": ..., "init_args": {...}}``
            (:func:`~bicql_lightning.policies.make_policy`): ``TiltedPriorPolicy`` (the
            default; ``None`` or no ``class_path``) or ``BoltzmannPolicy`` (the paper's
            :math:`\exp(Q/T)`), or a ``QPolicy`` subclass of yours. Training never uses it.
        proposal_data: data the Box proposal's Gaussian is fitted to, ``"expert"`` or ``"offline"``.
        proposal_uniform_weight: weight of the uniform component of the Box proposal.
        proposal_hidden_sizes: hidden widths of the Box proposal.
        proposal_fit_steps: maximum-likelihood steps fitting the proposal before training.
        proposal_lr: learning rate of the proposal fit.
        updates_per_sec_every: updates between two throughput measurements.
        log_every_n_updates: training metrics are logged every N updates (logging every
            update costs more than a small network's update); ``None`` follows the
            Trainer's ``log_every_n_steps``.
        capture_graph: on a CUDA device, capture one whole training iteration (sampling
            from the data module's device-resident data, both levels' updates with
            capturable Adam, the target network's Polyak step, the metrics) as one CUDA
            graph and replay it (:mod:`bicql_lightning.captured`): the same algorithm
            without the per-kernel launch cost that bounds small networks on a large GPU.
            One device only, data on it (``data_on_device``), ``TargetNetworkUpdate``
            Polyak (not hard) syncing. Off CUDA the same iteration runs eagerly.
        proposal_seed: seed of the module's own random stream, which draws the proposal and
            policy fits' minibatches and the Box proposal samples of every update; ``None``
            takes the run's seed (``seed_everything``, i.e. ``PL_GLOBAL_SEED``), or 0. The
            stream's state is saved in checkpoints.

    Distributed training (``strategy="ddp"``, any ``devices``/``num_nodes``): every
    process holds the same networks and draws the same global batch, of which it uses
    its own contiguous share (the data module's ``batch_size`` is the global batch). Each
    Q or reward update runs its backward pass outside DDP's gradient hooks and then
    averages exactly the gradients of the optimizer being stepped with one flattened
    ``all_reduce``; proposal samples are drawn for the global batch from the module's
    stream and sliced the same way. W processes with batch B/W are then the same
    algorithm as one process with batch B (up to float summation order).
    """

    model_name = "BiCQLML"
    seed_hparam = "proposal_seed"

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
        termination: Literal["auto", "failure", "success", "neutral"] = "auto",
        reward_level: Literal["free", "anchored", "data"] = "free",
        offline_reward_level: float = 0.1,
        terminal_reward: Literal["advantage", "zero"] = "advantage",
        reward_on_offline: bool = True,
        advantage_net: Literal["online", "target", "residual"] = "target",
        cql_value_with_data_action: bool = True,
        num_action_samples: int = 10,
        cql_gradient_samples: int | None = None,
        policy: dict[str, Any] | None = None,
        proposal_data: Literal["expert", "offline"] = "expert",
        proposal_uniform_weight: float = 0.5,
        proposal_hidden_sizes: list[int] = [256, 256],  # noqa: B006
        proposal_fit_steps: int = 2000,
        proposal_lr: float = 1e-3,
        updates_per_sec_every: int = 100,
        log_every_n_updates: int | None = None,
        capture_graph: bool = False,
        proposal_seed: int | None = None,
    ):
        super().__init__()
        for name, value, allowed in (("cql_data", cql_data, ("offline", "expert", "both")),
                                     ("advantage_net", advantage_net, ("online", "target", "residual")),
                                     ("proposal_data", proposal_data, ("expert", "offline")),
                                     ("termination", termination, TERMINATIONS),
                                     ("reward_level", reward_level, ("free", "anchored", "data")),
                                     ("terminal_reward", terminal_reward, ("advantage", "zero"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        for name, value in (("q_updates", q_updates), ("reward_updates", reward_updates),
                            ("log_every_n_updates", 1 if log_every_n_updates is None else log_every_n_updates),
                            ("num_action_samples", num_action_samples),
                            ("cql_gradient_samples", 1 if cql_gradient_samples is None else cql_gradient_samples)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if termination in ("failure", "success") and reward_bound <= 0:
            raise ValueError(f"termination={termination!r} shifts the bounded reward's range and needs "
                             f"reward_bound > 0 (got {reward_bound}); use termination='neutral' for an unbounded reward.")
        if reward_level == "data" and not reward_on_offline:
            raise ValueError("reward_level='data' holds the reward's mean over D's pairs and needs "
                             "reward_on_offline=True (the reward is then fitted on them).")
        check_common_hparams(gamma=gamma)
        make_policy(policy)  # a bad policy argument fails here, before any data is read
        self.save_hyperparameters()
        self._init_state()
        self.termination: str | None = None  # termination resolved ("auto" at fit start)
        self._captured: CapturedIteration | None = None  # capture_graph's iteration, built at fit start
        self._noise_tape: Any = None  # pre-drawn proposal noise while a SeedBatch runs the objectives
        if spaces is not None:
            self._build(check_spec(dict(spaces)))

    # ------------------------------------------------------------------ construction
    def _build(self, spaces: SpaceSpec) -> None:
        hp = self.hparams
        self._adopt_spaces(spaces)
        self.q_net = QEnsemble(spaces, hp.hidden_sizes, ensemble_size=2)
        self.target_q_net = copy.deepcopy(self.q_net).requires_grad_(False)
        self.reward_net = RewardNet(spaces, hp.reward_hidden_sizes, hp.reward_bound)
        if hp.termination != "auto":
            self.set_termination(hp.termination)
        # Fitted once before training (fit_proposal), then frozen: no gradients, and not part
        # of what DDP's reducer tracks.
        self.proposal = (None if self.discrete else
                         ActionProposal(spaces, hp.proposal_hidden_sizes, hp.proposal_uniform_weight)
                         .requires_grad_(False))
        self.policy = make_policy(hp.policy)
        self.policy.build(spaces, self.q_net, self.encoder, self.proposal, hp.temperature)
        self.built = True

    def _checkpoint_info(self) -> dict[str, Any]:
        # RewardNet.from_checkpoint rebuilds the reward network from this entry alone.
        info = super()._checkpoint_info()
        info["reward_net"] = {"spaces": dict(self.spaces), "hidden_sizes": list(self.hparams.reward_hidden_sizes),
                              "reward_bound": float(self.hparams.reward_bound)}
        info["policy_revision"] = self.policy.revision
        info["termination"] = self.termination
        return info

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        info = checkpoint[CHECKPOINT_KEY]
        self.policy.revision = int(info.get("policy_revision", 0))
        # Weights written before the option existed were trained with the symmetric range.
        self.termination = info.get("termination", "neutral")

    def set_termination(self, termination: str) -> None:
        """Fix what termination means (``termination``'s doc) and the reward's offset with it."""
        if termination not in TERMINATION_OFFSET:
            raise ValueError(f"termination must be one of {', '.join(map(repr, TERMINATION_OFFSET))}, "
                             f"got {termination!r}")
        self.termination = termination
        self.reward_net.offset.fill_(TERMINATION_OFFSET[termination] * self.hparams.reward_bound)

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
            noise = self._draw_noise(local * world_size, num, obs.device)
            pieces.append([x[rank * local:(rank + 1) * local] for x in noise])
        noise = tuple(torch.cat(parts) for parts in zip(*pieces))
        return self.proposal.sample(obs, num, noise=noise)

    def _draw_noise(self, rows: int, num: int, device: torch.device) -> tuple[Tensor, ...]:
        """The proposal noise of one training draw: from the module's stream, or, while a
        :class:`~bicql_lightning.seeds.SeedBatch` runs this module's objectives for many
        seeds at once, the next entry of the noise it drew beforehand from each seed's stream."""
        tape = self._noise_tape
        if tape is None:
            return self.proposal.draw_noise(rows, num, self._rng(), device)
        return tape.take(rows, num, device)

    def _eval_generator(self) -> torch.Generator:
        """A fresh, fixed stream for validation: its metrics are functions of the weights,
        and validation never moves the training stream (sanity checks, resumed runs)."""
        return torch.Generator(device=self.device).manual_seed(self._default_seed() + 1)


    def configure_optimizers(self):
        # On a GPU the update is bound by kernel launches at these sizes: one fused kernel
        # per Adam step instead of a few per parameter tensor.
        fused = self.device.type == "cuda"
        # A replayed graph must find Adam's step counts on the device, not on the host.
        capturable = fused and self.hparams.capture_graph
        q_opt = torch.optim.Adam(self.q_net.parameters(), lr=self.hparams.q_lr, fused=fused, capturable=capturable)
        r_opt = torch.optim.Adam(self.reward_net.parameters(), lr=self.hparams.reward_lr, fused=fused,
                                 capturable=capturable)
        return q_opt, r_opt

    def configure_callbacks(self):
        from .callbacks import FitPolicy, TargetNetworkUpdate

        # Without target syncing the TD targets never move, and without FitPolicy the
        # controller has no prior: add each unless the user configured one.
        return [cb() for cb in (TargetNetworkUpdate, FitPolicy)
                if not any(isinstance(c, cb) for c in self.trainer.callbacks)]

    def on_fit_start(self) -> None:
        needs_statistics = not bool(self.reward_net.encoder.initialized)
        super().on_fit_start()  # the random stream and the Q networks' normalisation
        datamodule = getattr(self.trainer, "datamodule", None)
        self.fit_to_data(datamodule, reward_statistics=needs_statistics)
        self._captured = self._capture_iteration(datamodule) if self.hparams.capture_graph else None
        world_size, _ = self._world()
        if is_distributed(world_size) and self.proposal is not None:
            # Every rank fitted the same data with the same stream; make the copies identical
            # even where a device's kernels are not bit-reproducible.
            broadcast_(list(self.proposal.parameters()), src=0)

    def fit_to_data(self, datamodule: Any, reward_statistics: bool = True) -> None:
        """What a fit reads from the data before its first update (also without a Trainer,
        :func:`~bicql_lightning.seeds.fit_seeds`): the reward network's normalisation (it
        carries its own copy, so it works outside this module), ``termination="auto"``
        resolved (a resumed run keeps its own), and the Box proposal's fit (once)."""
        if reward_statistics and datamodule is not None and hasattr(datamodule, "obs_mean"):
            self.reward_net.encoder.set_statistics(datamodule.obs_mean, datamodule.obs_std)
        if self.termination is None:
            self.set_termination(self._auto_termination(datamodule))
        if self.proposal is None or bool(self.proposal.fitted):
            return
        if datamodule is None or not hasattr(datamodule, "pairs"):
            raise ValueError("Fitting the Box-action proposal needs the data: pass an OfflineIRLDataModule to fit.")
        self.fit_proposal(*datamodule.pairs(self.hparams.proposal_data))

    def _auto_termination(self, datamodule: Any) -> str:
        if self.hparams.reward_bound <= 0:
            return "neutral"
        if datamodule is None or not hasattr(datamodule, "terminations"):
            raise ValueError("termination='auto' reads the data's terminal transitions: pass an OfflineIRLDataModule "
                             "to fit, or set termination to 'failure', 'success' or 'neutral'.")
        return resolve_termination(datamodule.terminations("expert"), datamodule.terminations("offline"))

    def fit_proposal(self, obs: Tensor, actions: Tensor, batch_size: int = 256) -> Tensor:
        """Fit the proposal's Gaussian by maximum likelihood, then freeze it. Returns the final NLL."""
        assert self.proposal is not None
        nll = fit_density(self.proposal, self.proposal.nll, self.encoder, obs, actions,
                          self.hparams.proposal_fit_steps, self.hparams.proposal_lr, self._rng(), batch_size)
        self.proposal.fitted.fill_(True)
        return nll

    @torch.no_grad()
    def learned_rewards(self, obs: Tensor, actions: Tensor, chunk: int = 1 << 14) -> Tensor:
        r""":math:`r_\theta(s,a)` ``(N,)`` for raw observations and actions, in chunks."""
        out = [full_precision(self.reward_net(obs[i:i + chunk].to(self.device), actions[i:i + chunk].to(self.device)))
               for i in range(0, obs.shape[0], chunk)]
        return torch.cat(out)

    @torch.no_grad()
    def soft_advantages(self, obs: Tensor, actions: Tensor, chunk: int = 1 << 13) -> Tensor:
        r""":math:`\min_i Q_i(s,a) - V(s)` ``(N,)`` under the online twins for raw observations and
        actions, in chunks; Box soft values from the module's stream (the default controller's
        refit weights, :func:`~bicql_lightning.policies.advantage_weights`)."""
        out = []
        for i in range(0, obs.shape[0], chunk):
            batch = {"obs": obs[i:i + chunk].to(self.device), "action": actions[i:i + chunk].to(self.device)}
            out.append(self._min_q(batch) - self._min_soft_value(self.q_net, batch["obs"], generator=self._rng()))
        return torch.cat(out)

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
        with_data = self.hparams.cql_value_with_data_action
        if with_data:
            log_data = self.proposal.log_prob(obs, batch["action"].unsqueeze(1))  # (B, 1)
            log_prop = torch.cat([log_data, log_prop], 1)
        if self.hparams.cql_gradient_samples is not None and torch.is_grad_enabled():
            return self._q_and_sampled_gradient_value(net, obs, actions, log_prop)
        q = full_precision(net(obs, actions))  # (E, B, 1+M)
        value = losses.sampled_soft_value(q if with_data else q[..., 1:], log_prop, self.hparams.temperature)
        return q[..., 0], value, q[..., 1:].mean(2)

    def _q_and_sampled_gradient_value(self, net: QEnsemble, obs: Tensor, actions: Tensor,
                                      log_prop: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``_q_and_value`` with ``cql_gradient_samples``: V's gradient through k picked samples.

        Q at all 1 + M actions is computed without a graph, for V and its weights; the
        gradient then flows through the data action (exactly, with its weight) and through
        k proposal samples per state drawn from the twins' mean weight ``p`` over the
        samples, each twin's draw reweighted by its own weight over ``p``. Bounded: that
        ratio is at most the ensemble size.
        """
        hp = self.hparams
        num, with_data = hp.cql_gradient_samples, hp.cql_value_with_data_action
        with torch.no_grad():
            q_all = full_precision(net(obs, actions))  # (E, B, 1+M)
            candidates = q_all if with_data else q_all[..., 1:]
            value = losses.sampled_soft_value(candidates, log_prop, hp.temperature)  # (E, B)
            logits = candidates / hp.temperature - log_prop
            sample_logits = logits[..., -hp.num_action_samples:]  # the proposal samples' (E, B, M)
            # Each twin's weight of the samples as a whole, times its weights among them.
            sample_share = (sample_logits.logsumexp(-1) - logits.logsumexp(-1)).exp()  # (E, B)
            within = torch.softmax(sample_logits, dim=-1)  # (E, B, M)
            pick_prob = within.mean(0)  # (B, M)
            uniforms = self._uniform_noise(obs.shape[0], (num,))  # (B, k)
            picks = torch.searchsorted(pick_prob.cumsum(-1), uniforms).clamp_max(hp.num_action_samples - 1)
            ratio = within.gather(2, picks.expand(within.shape[0], -1, -1)) / pick_prob.gather(1, picks)
            coefficients = sample_share.unsqueeze(2) * ratio / num  # (E, B, k)
            if with_data:
                data_weight = torch.softmax(logits, dim=-1)[..., :1]  # (E, B, 1)
                coefficients = torch.cat([data_weight, coefficients], 2)
        picked = actions[:, 1:].gather(1, picks.unsqueeze(2).expand(-1, -1, actions.shape[2]))  # (B, k, A)
        q = full_precision(net(obs, torch.cat([actions[:, :1], picked], 1)))  # (E, B, 1+k)
        value = losses.value_surrogate(value, q if with_data else q[..., 1:], coefficients)
        return q[..., 0], value, q_all[..., 1:].mean(2)

    def _min_soft_value(self, net: QEnsemble, obs_raw: Tensor, segments: Sequence[int] | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
        """Soft value of the twins' pointwise minimum, ``(B,)``: the pessimistic target."""
        obs = self.encoder(obs_raw)
        if self.discrete:
            return losses.soft_value(full_precision(net(obs)).min(0).values, self.hparams.temperature)
        samples, log_prop = self._sample_actions(obs, segments, generator)
        q = full_precision(net(obs, samples)).min(0).values  # (B, M)
        return losses.sampled_soft_value(q, log_prop, self.hparams.temperature)

    def _twin_q(self, batch: Batch, net: QEnsemble | None = None) -> Tensor:
        """Each twin's Q at the batch's pairs, ``(E, B)``."""
        net = self.q_net if net is None else net
        obs = self.encoder(batch["obs"])
        if self.discrete:
            q = full_precision(net(obs))  # (E, B, A)
            index = batch["action"].long().view(1, -1, 1).expand(q.shape[0], -1, 1)
            return q.gather(2, index).squeeze(2)
        return full_precision(net(obs, batch["action"]))

    def _min_q(self, batch: Batch, net: QEnsemble | None = None) -> Tensor:
        return self._twin_q(batch, net).min(0).values

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
        """The CQL coefficient (a hook: an adaptive variant overrides it)."""
        return self.hparams.alpha

    def reward_pairs(self, offline: Batch, expert: Batch) -> tuple[Batch, tuple[int, int] | None]:
        """The pairs the reward is regressed on, and their parts' sizes (see ``reward_objective``)."""
        if self.hparams.reward_on_offline and expert is not offline:
            return _cat(expert, offline), (expert["obs"].shape[0], offline["obs"].shape[0])
        return expert, None

    def reward_target(self, q_data: Tensor, next_value: Tensor, pairs: Batch) -> Tensor:
        """What the reward is regressed onto: the soft advantage (a hook for ablations)."""
        return losses.soft_advantage(q_data, next_value, pairs["terminated"], self.hparams.gamma)

    @torch.no_grad()
    def advantage_parts(self, pairs: Batch, segments: Sequence[int] | None = None,
                        offline_next_value: Tensor | None = None,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Q(s, a) and V(s') of the soft advantage the reward is regressed onto, ``(B,)`` each.

        ``online`` and ``target`` take both from one network, the twins' minimum; ``residual``
        takes the online twins' mean at the pair and the target network's V(s'), the soft
        value of the step's TD targets, so on D's pairs A - r_θ is the Q update's residual.
        ``offline_next_value``: the step's :meth:`target_soft_value` of the offline batch,
        reused for the pairs' offline part where the target network's V(s') is wanted.
        """
        mode = self.hparams.advantage_net
        value_net = self.q_net if mode == "online" else self.target_q_net
        q_data = self._twin_q(pairs).mean(0) if mode == "residual" else self._min_q(pairs, value_net)
        if value_net is self.q_net or offline_next_value is None:
            next_value = self._min_soft_value(value_net, pairs["next_obs"], segments, generator)
        elif segments is None:
            next_value = offline_next_value
        else:
            n_expert = segments[0]
            expert_value = self._min_soft_value(value_net, pairs["next_obs"][:n_expert], segments[:1])
            next_value = torch.cat([expert_value, offline_next_value])
        return q_data, next_value

    def reward_objective(self, pairs: Batch, segments: Sequence[int] | None = None,
                         offline_next_value: Tensor | None = None) -> tuple[Tensor, losses.Metrics]:
        """Upper level: regress r_θ onto the soft advantage of the frozen Q (``advantage_net``).

        ``segments``: local sizes of the parts ``pairs`` concatenates (expert, offline), so
        that proposal samples follow each part's global batch (see ``_sample_actions``).
        ``offline_next_value``: with ``advantage_net`` ``"target"`` or ``"residual"``, the step's
        :meth:`target_soft_value` of the offline batch, reused for the pairs' offline part
        (all of ``pairs`` when ``segments`` is ``None`` and D = D_E).
        """
        with torch.no_grad():
            q_data, next_value = self.advantage_parts(pairs, segments, offline_next_value)
            target = self.reward_target(q_data, next_value, pairs)
        reward = full_precision(self.reward_net(pairs["obs"], pairs["action"]))
        level = self.hparams.reward_level
        if level != "free":
            # anchored: the mean gap A - r over all pairs; data: the mean of A over D's pairs
            # (the part after the expert's, or all pairs where D is D_E).
            offline = target if segments is None else target[segments[0]:]
            gap = (target - reward.detach()).mean() if level == "anchored" else offline.mean()
            world_size, _ = self._world()
            if is_distributed(world_size):  # equal shares: the global batch's mean
                all_reduce_mean_([gap], world_size)
            target = (losses.level_anchored_target(target, reward.detach(), gap) if level == "anchored"
                      else losses.level_pinned_target(target, gap, self.offline_level()))
        if self.hparams.terminal_reward == "zero" and self.termination in ("failure", "success"):
            target = losses.terminal_zero_target(target, pairs["terminated"])
        loss, metrics = losses.reward_loss(reward, target)
        metrics["_reward/sq_mean"] = reward.detach().float().pow(2).mean()  # for the global std under DDP
        return loss, metrics

    def offline_level(self) -> float:
        """Where ``reward_level="data"`` holds the mean reward of D's pairs (its doc)."""
        hp = self.hparams
        # From the termination rather than the offset buffer: no device read inside an update.
        termination = self.termination or "neutral"  # unresolved "auto" before a fit: the offset is 0
        centre = TERMINATION_OFFSET[termination] * hp.reward_bound
        floor = centre - hp.reward_bound if termination in ("failure", "success") else centre
        return floor + hp.offline_reward_level * hp.reward_bound

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> None:
        if self._captured is not None:  # the batch is drawn inside the iteration (capture_graph)
            # The graph's own outputs: a logged row copies them before the next replay overwrites them.
            self._finish_step(self._captured.step(), copy=True)
        else:
            self._finish_step(self._iteration(batch["offline"], batch["expert"]))

    def _iteration(self, offline: Batch, expert: Batch) -> losses.Metrics:
        """The step's Q updates, then its reward updates; their last metrics (device tensors)."""
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
            self.after_q_update()
        metrics.update(q_metrics)
        metrics.update(self.after_q_updates(q_metrics))

        pairs, segments = self.reward_pairs(offline, expert)
        for _ in range(self.hparams.reward_updates):
            self.toggle_optimizer(r_opt)
            loss, r_metrics = self.reward_objective(pairs, segments, next_value)
            self._update(r_opt, loss)
            self.untoggle_optimizer(r_opt)
            self.after_reward_update()
        metrics.update(r_metrics)
        return {k: v.detach() for k, v in metrics.items()}

    @property
    def draws_own_batches(self) -> bool:
        """Whether this fit's iteration samples its batches itself (``capture_graph``): the
        data module's training stream then yields empty placeholders instead of drawing."""
        return self._captured is not None

    def _capture_iteration(self, datamodule: Any) -> CapturedIteration:
        """``capture_graph``: the whole iteration, sampling and target sync included, as one
        function of no inputs; the data module stops drawing batches for the trainer."""
        from .callbacks import TargetNetworkUpdate

        world_size, _ = self._world()
        if is_distributed(world_size):
            raise ValueError(f"capture_graph runs on one device, not {world_size} processes: drop "
                             "capture_graph under DDP (its gradient all_reduce is outside any graph).")
        if datamodule is None or not hasattr(datamodule, "sample_batch"):
            raise ValueError("capture_graph draws its batches inside the iteration: fit with an OfflineIRLDataModule.")
        syncs = [cb for cb in self.trainer.callbacks if isinstance(cb, TargetNetworkUpdate)]
        if len(syncs) != 1 or syncs[0].hard_every_n_updates is not None:
            raise ValueError("capture_graph puts the target network's Polyak step inside the iteration: use one "
                             "TargetNetworkUpdate with tau (not hard_every_n_updates).")
        tau = syncs[0].tau
        data_generator = datamodule.sampling_generator
        if self.device.type == "cuda" and data_generator.device.type != "cuda":
            raise ValueError("capture_graph on a GPU samples from data on the GPU: set the data module's "
                             "data_on_device: true (and leave room for the data there).")

        def iteration() -> losses.Metrics:
            batch = datamodule.sample_batch()
            metrics = self._iteration(batch["offline"], batch["expert"])
            polyak_update(self.target_q_net, self.q_net, tau)
            return metrics

        return CapturedIteration(iteration, self.device, [data_generator, self._rng()])

    # Hooks for variants of the algorithm (bench/variants.py); the paper's loop needs none.
    def after_q_update(self) -> None:
        """After each Q optimizer step."""

    def after_q_updates(self, q_metrics: losses.Metrics) -> losses.Metrics:
        """After a step's Q updates, with the last one's metrics; returns metrics to log."""
        return {}

    def after_reward_update(self) -> None:
        """After each reward optimizer step."""

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
    def act(self, obs: np.ndarray | Tensor, deterministic: bool = True) -> np.ndarray:
        """Action(s) of the module's ``policy`` for raw observation(s), one or a batch."""
        return self.policy.act(obs, deterministic)
