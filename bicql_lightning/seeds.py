r"""K seeds of BiCQL-ML in one process, trained as one batched computation.

A benchmark cell is trained over several seeds, and at the benchmark's sizes (batch 256,
two 256x256 twins) one seed's update is a few hundred small kernels: on a large GPU their
launches, not their arithmetic, set the rate. :class:`SeedBatch` stacks K independently
initialised :class:`~bicql_lightning.BiCQLML` replicas (networks, Adam moments, data and
proposal-noise streams) along a leading axis and runs the module's *own* objectives
(``target_soft_value``, ``q_objective``, ``reward_objective``) once for all of them with
``torch.func.vmap``, so each kernel launch serves K seeds.

Each replica stays the run its seed would be on its own: its batches come from its own data
module's generator and its proposal noise from its own stream, drawn before each iteration
in the order the single run draws them (recorded once, from the objectives themselves), and
one Adam over the stacked tensors is K Adams, element for element. After N updates a
replica's parameters equal its seed's ``Trainer.fit`` to float tolerance
(``tests/test_seeds.py``). The loop is the module's plain iteration: ``q_updates`` Q
updates, ``reward_updates`` reward updates, then the target's Polyak step (what
:class:`~bicql_lightning.TargetNetworkUpdate` does), on one device, without DDP,
``capture_graph``, ``cql_gradient_samples`` or subclasses that override the loop's hooks.

:func:`fit_seeds` is the whole fit without a Trainer: what ``BiCQLML.on_fit_start`` and
:class:`~bicql_lightning.FitPolicy` do before the first update, the batched updates, then
each replica's policy refit. ``python -m bench.run --batch-seeds`` trains a cell's seeds with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .callbacks import refit_policy
from .cpu_memory import keep_freed_memory
from .module import BiCQLML

Batch = dict[str, Tensor]
Noise = tuple[Tensor, ...]
# The hooks BiCQLML's iteration calls; a subclass that overrides one changes the loop.
LOOP_HOOKS = ("after_q_update", "after_q_updates", "after_reward_update", "cql_alpha", "reward_target",
              "reward_pairs", "q_objective", "reward_objective", "target_soft_value", "_iteration")


class _Tape:
    """Proposal noise for ``BiCQLML._draw_noise``: pre-drawn entries handed out in order, or,
    when recording, fresh draws from a scratch stream with their row counts noted."""

    def __init__(self, entries: Sequence[Noise] = (), recorder: tuple[nn.Module, torch.Generator] | None = None):
        self.entries, self.recorder, self.rows = list(entries), recorder, []

    def take(self, rows: int, num: int, device: torch.device) -> Noise:
        if self.recorder is not None:
            proposal, generator = self.recorder
            self.rows.append(rows)
            return proposal.draw_noise(rows, num, generator, device)
        if not self.entries or self.entries[0][0].shape[0] != rows:
            raise RuntimeError(f"SeedBatch drew its noise for another sequence of draws than the objectives make "
                               f"(next draw: {rows} states): the loop changed under it.")
        return self.entries.pop(0)


class _Objectives(nn.Module):
    """The module's objectives behind ``forward``, so ``functional_call`` runs them with any
    replica's tensors. ``shared``: D = D_E, one batch serving as both (as ``sample_batch``
    gives it: the objectives test ``expert is offline``, which vmap's unpacking would break)."""

    def __init__(self, model: BiCQLML):
        super().__init__()
        self.model = model

    def forward(self, piece: str, tape: _Tape, offline: Batch, expert: Batch, shared: bool,
                next_value: Tensor | None = None) -> Any:
        model = self.model
        expert = offline if shared else expert
        model._noise_tape = tape
        try:
            if piece == "next_value":
                return model.target_soft_value(offline)
            if piece == "q":
                return model.q_objective(offline, expert, next_value)
            pairs, segments = model.reward_pairs(offline, expert)
            loss, metrics = model.reward_objective(pairs, segments, next_value)
            metrics.pop("_reward/sq_mean", None)  # only for the DDP metrics
            return loss, metrics
        finally:
            model._noise_tape = None


def check_replicas(models: Sequence[BiCQLML]) -> None:
    """Refuse what :class:`SeedBatch` cannot train as the single runs would, in one line each."""
    if not models:
        raise ValueError("SeedBatch needs at least one model.")
    first = models[0]
    for model in models:
        if not isinstance(model, BiCQLML) or any(getattr(type(model), h) is not getattr(BiCQLML, h) for h in LOOP_HOOKS):
            raise ValueError(f"SeedBatch trains BiCQLML's own loop; {type(model).__name__} overrides it: train it "
                             "one seed at a time.")
        hp = model.hparams
        if hp.capture_graph or hp.cql_gradient_samples is not None:
            raise ValueError("SeedBatch batches the plain iteration: set capture_graph: false and "
                             "cql_gradient_samples: null (or train one seed at a time).")
        differing = [k for k in hp if k != "proposal_seed" and hp[k] != first.hparams[k]]
        if differing:
            raise ValueError(f"SeedBatch trains replicas of one configuration; these differ: {', '.join(differing)}.")
        if model.device != first.device:
            raise ValueError(f"SeedBatch runs on one device; the models are on {first.device} and {model.device}.")
        if model._trainer is not None and model._trainer.world_size > 1:
            raise ValueError("SeedBatch runs in one process, not under DDP.")


class SeedBatch:
    """K prepared BiCQL-ML replicas (spaces built, data read: :func:`fit_seeds` prepares them)
    trained as one batched computation.

    Args:
        models: the replicas, one per seed, same configuration, on one device.
        datamodules: each replica's data module (its generator is that seed's data stream).
        tau: Polyak rate of the target networks (``TargetNetworkUpdate``'s).
    """

    def __init__(self, models: Sequence[BiCQLML], datamodules: Sequence[Any], tau: float = 0.005):
        check_replicas(models)
        if models[0].device.type == "cpu":
            keep_freed_memory()  # K stacked activations are the largest blocks of all (cpu_memory)
        if len(datamodules) != len(models):
            raise ValueError(f"{len(models)} models but {len(datamodules)} data modules: give one per seed.")
        self.models, self.datamodules, self.tau = list(models), list(datamodules), tau
        template = self.models[0]
        self.device = template.device
        self.calls = _Objectives(template)
        named = [dict(_named_tensors(m)) for m in self.models]
        self.state = {name: torch.stack([n[name].detach() for n in named]).clone() for name in named[0]}
        params = ["model." + n for n, _ in template.named_parameters()]
        self.q_names = [n for n in params if n.startswith("model.q_net.")]
        self.reward_names = [n for n in params if n.startswith("model.reward_net.")]
        self.target_names = [n.replace("model.q_net.", "model.target_q_net.", 1) for n in self.q_names]
        # Everything but the level being differentiated, as views of the same stacked tensors.
        self.rest_q = {n: t for n, t in self.state.items() if n not in set(self.q_names)}
        self.rest_r = {n: t for n, t in self.state.items() if n not in set(self.reward_names)}
        hp, fused = template.hparams, self.device.type == "cuda"
        self.q_opt = torch.optim.Adam([self.state[n] for n in self.q_names], lr=hp.q_lr, fused=fused)
        self.r_opt = torch.optim.Adam([self.state[n] for n in self.reward_names], lr=hp.reward_lr, fused=fused)
        self.shared = bool(getattr(self.datamodules[0], "shared_batches", False))
        self.plan = self._record_plan()
        self.updates = 0

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict[str, Tensor]:
        """One update of every replica; its metrics, ``(K,)`` each."""
        hp = self.models[0].hparams
        offline, expert = self._draw_batches()
        tapes = self._draw_noise()
        next_value = vmap(self._call("next_value"))(self.state, tapes["next_value"], offline, expert)
        metrics: dict[str, Tensor] = {}
        for i in range(hp.q_updates):
            grads, metrics_q = vmap(grad(self._loss("q"), has_aux=True))(
                self._part(self.q_names), self.rest_q, tapes[f"q{i}"], offline, expert, next_value)
            self._apply(self.q_opt, self.q_names, grads)
        metrics.update(metrics_q)
        for i in range(hp.reward_updates):
            grads, metrics_r = vmap(grad(self._loss("reward"), has_aux=True))(
                self._part(self.reward_names), self.rest_r, tapes[f"reward{i}"], offline, expert, next_value)
            self._apply(self.r_opt, self.reward_names, grads)
        metrics.update(metrics_r)
        with torch.no_grad():
            torch._foreach_lerp_([self.state[n] for n in self.target_names], [self.state[n] for n in self.q_names],
                                 self.tau)
        self.updates += 1
        return metrics

    def _call(self, piece: str) -> Callable[..., Any]:
        def run(state, tape, offline, expert, next_value=None):
            return functional_call(self.calls, state, (piece, _Tape(tape), offline, expert, self.shared, next_value))
        return run

    def _loss(self, piece: str) -> Callable[..., Any]:
        run = self._call(piece)

        def loss(params, rest, tape, offline, expert, next_value):
            return run({**rest, **params}, tape, offline, expert, next_value)
        return loss

    def _part(self, names: list[str]) -> dict[str, Tensor]:
        return {n: self.state[n] for n in names}

    @staticmethod
    def _apply(optimizer: torch.optim.Optimizer, names: list[str], grads: dict[str, Tensor]) -> None:
        for param, name in zip(optimizer.param_groups[0]["params"], names):
            param.grad = grads[name]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ random streams
    def _draw_batches(self) -> tuple[Batch, Batch]:
        batches = [dm.sample_batch() for dm in self.datamodules]
        stack = {part: {k: torch.stack([b[part][k] for b in batches]).to(self.device) for k in batches[0][part]}
                 for part in ("offline", "expert")}
        return stack["offline"], stack["offline"] if self.shared else stack["expert"]

    def _draw_noise(self) -> dict[str, list[Noise]]:
        """Each replica's proposal noise for this iteration, from its own stream, in the order
        its single run draws it; stacked over replicas."""
        template = self.models[0]
        num = template.hparams.num_action_samples
        per_model = [{piece: [m.proposal.draw_noise(rows, num, m._rng(), self.device) for rows in plan]
                      for piece, plan in self.plan.items()} for m in self.models]
        return {piece: [tuple(torch.stack(parts) for parts in zip(*[d[piece][j] for d in per_model]))
                        for j in range(len(plan))] for piece, plan in self.plan.items()}

    def _record_plan(self) -> dict[str, list[int]]:
        """The states of each proposal draw of one iteration, piece by piece: run once with
        the first replica's tensors and a scratch stream (nothing is updated)."""
        template = self.models[0]
        hp = template.hparams
        offline, expert = self._shape_batches()
        state = {n: t[0] for n, t in self.state.items()}
        plan: dict[str, list[int]] = {}
        scratch = torch.Generator(device=self.device).manual_seed(0)
        recorder = (template.proposal, scratch) if template.proposal is not None else None
        pieces = ["next_value"] + [f"q{i}" for i in range(hp.q_updates)] + [f"reward{i}" for i in range(hp.reward_updates)]
        next_value = None
        with torch.no_grad():
            for piece in pieces:
                tape = _Tape(recorder=recorder)
                kind = piece.rstrip("0123456789")
                out = functional_call(self.calls, state, (kind, tape, offline, expert, self.shared, next_value))
                if kind == "next_value":
                    next_value = out
                plan[piece] = tape.rows
        return plan

    def _shape_batches(self) -> tuple[Batch, Batch]:
        """Batches of the training shapes for recording the plan, without touching any stream."""
        dm = self.datamodules[0]
        sizes = {"offline": dm.hparams.batch_size, "expert": dm.hparams.expert_batch_size or dm.hparams.batch_size}
        out = {}
        for part, store in (("offline", dm.offline_store), ("expert", dm.expert_store)):
            index = torch.arange(sizes[part]) % len(store)
            out[part] = {k: v.to(self.device) for k, v in store.take(index.to(store.device)).items()}
        return out["offline"], out["offline"] if self.shared else out["expert"]

    # ------------------------------------------------------------------ results
    @torch.no_grad()
    def write_back(self) -> None:
        """Copy each replica's stacked tensors into its module (and count its updates)."""
        for k, model in enumerate(self.models):
            for name, tensor in _named_tensors(model):
                tensor.copy_(self.state[name][k])
            model.updates += self.updates
        self.updates = 0


def _named_tensors(model: BiCQLML):
    """The module's parameters and buffers under ``_Objectives``' names (shared ones once)."""
    yield from (("model." + n, t) for n, t in model.named_parameters())
    yield from (("model." + n, t) for n, t in model.named_buffers())


def prepare(model: BiCQLML, datamodule: Any, seed: int) -> None:
    """What a ``Trainer.fit`` of ``model`` does before its first update: its random stream
    (seeded with ``seed`` unless the model names its own), the Q networks' normalisation,
    :meth:`BiCQLML.fit_to_data` and the policy's fit (FitPolicy)."""
    datamodule.setup("fit", device=model.device)
    model._make_generator(int(model.hparams.proposal_seed) if model.hparams.proposal_seed is not None else seed)
    if not bool(model.encoder.initialized):
        model.encoder.set_statistics(datamodule.obs_mean, datamodule.obs_std)
    model.fit_to_data(datamodule, reward_statistics=not bool(model.reward_net.encoder.initialized))
    if getattr(model.policy, "needs_fit", False):
        model.policy.fit(datamodule, model._rng())


def fit_seeds(models: Sequence[BiCQLML], datamodules: Sequence[Any], seeds: Sequence[int], updates: int,
              tau: float = 0.005, callback: Callable[[int, dict[str, Tensor]], None] | None = None) -> None:
    """Train K replicas, one per seed, as one batched computation: each ends as its seed's
    ``Trainer.fit`` of ``updates`` updates would (default callbacks: Polyak target sync with
    ``tau``, the policy fitted before and refitted after). ``callback(update, metrics)`` is
    called after every update with the ``(K,)`` metrics. In place; returns nothing."""
    if len(seeds) != len(models):
        raise ValueError(f"{len(models)} models but {len(seeds)} seeds: give one seed per model.")
    for model, datamodule, seed in zip(models, datamodules, seeds):
        prepare(model, datamodule, seed)
    batch = SeedBatch(models, datamodules, tau)
    for update in range(1, updates + 1):
        metrics = batch.step()
        if callback is not None:
            callback(update, metrics)
    batch.write_back()
    for model, datamodule in zip(models, datamodules):
        refit_policy(model, datamodule)



def save_checkpoint(model: BiCQLML, path: str) -> None:
    """A replica's weights as the checkpoint its own ``Trainer.fit`` would leave (Lightning's
    format, written atomically): ``BiCQLML.load_from_checkpoint`` and
    ``RewardNet.from_checkpoint`` read it."""
    import lightning

    from .distributed import AtomicCheckpointIO

    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                  "hparams_name": "kwargs", "pytorch-lightning_version": lightning.__version__,
                  "epoch": 0, "global_step": 2 * model.updates}
    model.on_save_checkpoint(checkpoint)
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)


__all__ = ["SeedBatch", "check_replicas", "fit_seeds", "prepare", "save_checkpoint"]
