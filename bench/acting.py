"""Compare BiCQL-ML's acting rules on the same trained weights (an experiment, not the library).

    python -m bench.acting --manifest ../shared/experts/experts.json --data DATA \\
        --task hopper --regime with-mixed --n 10 --seed 0

Trains one benchmark cell exactly as ``bench.run`` does (``configs/bench/bicql.yaml``;
the rule ``config`` is the model's own policy, so its score is the cell's benchmark score),
then evaluates each acting rule on those weights with the protocol's 10 deterministic
episodes. Each rule is a policy object built beside the model's, sharing its Q and its
fitted prior; nothing of the model is changed:

* ``config``: the model's ``policy`` as trained;
* ``prior_mode``: the greedy action of the default controller's acting prior (Q unused);
* ``tilted:T``: :class:`~bicql_lightning.TiltedPriorPolicy` at acting temperature T, tilting
  whichever prior acts (``tilt_after_refit`` on);
* ``boltzmann:T``: :class:`~bicql_lightning.BoltzmannPolicy` (the paper's) at temperature T;
* ``choice:T``: per state, the refit's mode or D_E's prior tilted at T, whichever Q ranks
  higher (:class:`ChoicePolicy`);
* ``ascent:T:K[:ETA]``: the mode of prior(a|s)·exp(Q(s,a)/T) found by K preconditioned
  ascent steps from the prior's mode (:func:`tilted_mode`), kept where it scores above the
  best of the tilted candidates (:class:`AscentPolicy`).

For rules that read Q it also reports the share of steps where the action moved off the
prior's greedy one. Prints one JSON line.

Tuning a rule on the protocol's own evaluation episodes (seeds 10000-10009) fits it to them;
``--first-seed 20000 --episodes 30`` scores every rule on other episodes instead, and each
rule's standard error over episodes (``"RULE se"``) says which differences are larger than
the episodes' spread. ``--checkpoint PATH`` saves the trained cell there (a Lightning
checkpoint that also names its cell) and, when PATH exists, loads it instead of training:
one training, any number of rule comparisons. A checkpoint of another cell is refused.
``--run-checkpoints DIR`` scores the rules on the weights a ``bench.run`` cell saved in its
``--checkpoints`` folder instead (``--demos sub20`` for protocol version 2's subsampled
cells), so a benchmark row's own weights can be acted on in other ways.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.datasets import read_manifest
from bench.run import EVAL_SEEDS, OFFLINE, ROOT, SUBSAMPLE, cell_data, checkpoint_path, set_precision, train_cell
from bicql_lightning import BiCQLML, BoltzmannPolicy, TiltedPriorPolicy
from bicql_lightning.callbacks import normalized_score, rollout_returns

DEFAULT_RULES = ["config", "prior_mode", "tilted:1", "tilted:4", "boltzmann:1"]


def parse_rule(rule: str) -> tuple[str, tuple[float, ...]]:
    """``NAME[:ARGS]`` -> ``(name, numbers)``, checked before anything is trained."""
    name, *args = rule.split(":")
    arity = {"config": (0, 0), "prior_mode": (0, 0), "tilted": (1, 1), "boltzmann": (1, 1), "ascent": (2, 3), "choice": (1, 1)}
    if name not in arity or not arity[name][0] <= len(args) <= arity[name][1]:
        raise SystemExit(f"unknown acting rule {rule!r}: use config, prior_mode, tilted:T, boltzmann:T, choice:T "
                         "or ascent:T:K[:ETA] (e.g. tilted:4)")
    try:
        numbers = tuple(float(x) for x in args)
    except ValueError:
        raise SystemExit(f"acting rule {rule!r}: its arguments must be numbers") from None
    if name == "ascent":
        numbers = numbers + (0.5,) * (3 - len(numbers))
        if numbers[0] <= 0 or numbers[1] < 1 or not 0 < numbers[2] <= 1:
            raise SystemExit(f"acting rule {rule!r}: ascent:T:K[:ETA] needs T > 0, K >= 1 and 0 < ETA <= 1")
    elif numbers and numbers[0] <= 0:
        raise SystemExit(f"acting rule {rule!r}: the temperature must be positive")
    return name, numbers


def tilted_mode(model, prior, enc: torch.Tensor, t_act: float, steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Ascent on the tilted log density :math:`F(u) = \min_i Q_i(s, a(u))/T + \log\mathcal N(u; \mu,
    \sigma^2)` over the prior's pre-clipping point :math:`u` (a(u): the clipped action), from
    :math:`u = \mu`, preconditioned by the prior's covariance:
    :math:`u \leftarrow u + \eta\,[\sigma^2 \nabla_u Q/T - (u - \mu)]` (for Q linear in a,
    one step with :math:`\eta = 1` lands on the tilted Gaussian's mode). Returns the
    action ``(B, A)`` and :math:`F` there ``(B,)``."""
    with torch.no_grad():
        mean, log_std = prior(enc)
    var = (2 * log_std).exp()

    def objective(u):
        action = prior.from_unit(u.clamp(-1.0, 1.0))
        q = model.q_net(enc, action.unsqueeze(1)).min(0).values.squeeze(1)  # (B,)
        log_prior = (-0.5 * ((u - mean) ** 2) / var - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        return q, log_prior, action

    u = mean.clone()
    for _ in range(int(steps)):
        u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            q, _, _ = objective(u)
            (grad,) = torch.autograd.grad(q.sum(), u)
        u = u.detach() + eta * (var * grad / t_act - (u.detach() - mean))
    with torch.no_grad():
        q, log_prior, action = objective(u)
    return action, q / t_act + log_prior


class AscentPolicy(TiltedPriorPolicy):
    """The tilted prior's best candidate, replaced by the ascended mode where that scores higher."""

    def __init__(self, temperature: float = 4.0, num_candidates: int = 64, steps: int = 20, eta: float = 0.5,
                 **kwargs):
        super().__init__(temperature=temperature, num_candidates=num_candidates, **kwargs)
        self.steps, self.eta = steps, eta

    def actions(self, enc: torch.Tensor, deterministic: bool) -> torch.Tensor:
        prior = self.acting_prior
        noise = self._noise(enc.shape[0], (self.num_candidates, prior.act_dim), True, enc.device)
        cands, log_prior = prior.candidates(enc, noise)
        logits = self.q_net(enc, cands).min(0).values / self.temperature + log_prior
        best = logits.argmax(1)
        rows = torch.arange(cands.shape[0], device=enc.device)
        sampled, sampled_f = cands[rows, best], logits[rows, best]
        action, f = tilted_mode(self, prior, enc, self.temperature, self.steps, self.eta)
        return torch.where((f > sampled_f).unsqueeze(1), action, sampled)


class ChoicePolicy(TiltedPriorPolicy):
    """Per state, the refit's mode or D_E's prior tilted by Q, whichever Q ranks higher
    (a Q-greedy choice between the two controllers; an experiment)."""

    def actions(self, enc: torch.Tensor, deterministic: bool) -> torch.Tensor:
        refit = self.relabeled_prior.mode(enc)
        noise = self._noise(enc.shape[0], (self.num_candidates, self.prior.act_dim), True, enc.device)
        cands, log_prior = self.prior.candidates(enc, noise)
        clone = self._pick(enc, cands, log_prior, log_prior, True)
        both = torch.stack([refit, clone], 1)  # (B, 2, A)
        q = self.q_net(enc, both).min(0).values  # (B, 2)
        return both[torch.arange(enc.shape[0], device=enc.device), q.argmax(1)]


def sibling_policy(model, policy_cls, **init_args):
    """A policy of ``policy_cls`` built on ``model``'s Q, carrying the fitted priors of the
    model's own policy where it has them; the model is left as it is."""
    if issubclass(policy_cls, TiltedPriorPolicy) and isinstance(model.policy, TiltedPriorPolicy):
        init_args.setdefault("hidden_sizes", model.policy.hidden_sizes)
    policy = policy_cls(**init_args)
    policy.build(model.spaces, model.q_net, model.encoder, model.proposal, model.hparams.temperature)
    if isinstance(policy, TiltedPriorPolicy) and isinstance(model.policy, TiltedPriorPolicy):
        policy.load_state_dict(model.policy.state_dict())
    return policy.to(model.device)


def rule_policy(model, rule: str):
    """``(policy, moved)``: a function of stacked raw observations, and a counter
    ``[steps moved off the prior's greedy action, steps]`` it updates."""
    name, numbers = parse_rule(rule)
    moved = [0, 0]
    prior = getattr(model.policy, "acting_prior", None)
    if name == "prior_mode":
        if prior is None:
            raise SystemExit("prior_mode needs a model whose policy has a prior (TiltedPriorPolicy)")

        @torch.no_grad()
        def greedy(obs):
            return prior.mode(model.encoder(torch.as_tensor(obs, device=model.device))).cpu().numpy()
        return greedy, moved
    candidates = model.policy.num_candidates
    policy = {"config": lambda: model.policy,
              "tilted": lambda: sibling_policy(model, TiltedPriorPolicy, temperature=numbers[0],
                                               num_candidates=candidates, tilt_after_refit=True),
              "boltzmann": lambda: sibling_policy(model, BoltzmannPolicy, temperature=numbers[0],
                                                  num_candidates=candidates),
              "choice": lambda: sibling_policy(model, ChoicePolicy, temperature=numbers[0],
                                               num_candidates=candidates),
              "ascent": lambda: sibling_policy(model, AscentPolicy, temperature=numbers[0], steps=int(numbers[1]),
                                               eta=numbers[2], num_candidates=candidates)}[name]()

    def act(obs):
        action = policy.act(obs)
        if prior is not None:
            with torch.no_grad():
                mode = prior.mode(model.encoder(torch.as_tensor(obs, device=model.device))).cpu().numpy()
            moved[0] += int((np.abs(action - mode).max(-1) > 1e-6).sum())
            moved[1] += len(obs)
        return action
    return act, moved


def run_model(task, regime: str, n: int, seed: int, config: dict, demos: str, folder: str, data=None):
    """``(model, info)`` of the cell ``bench.run`` trained and kept in ``folder`` (its
    ``--checkpoints``); ``info`` holds the score's reference returns (the benchmark score and
    wall time are in that run's results row, not in its checkpoint), read from ``data``, the
    cell's data module, where the caller already has it."""
    path = checkpoint_path(Path(folder), task, regime, demos, n, seed)
    if not path.exists():
        raise SystemExit(f"{path} does not exist: bench.run keeps a cell's checkpoint under its --checkpoints "
                         "folder; run that cell there first, or train it here without --run-checkpoints")
    data = cell_data(task, regime, n, seed, config, demos) if data is None else data
    random_return, expert_return = data.ref_scores
    info = {"benchmark_score": None, "train_wall_s": None, "random_return": random_return,
            "expert_return": expert_return}
    return BiCQLML.load_from_checkpoint(str(path), map_location="cpu"), info


def cell_model(task, regime: str, n: int, seed: int, config: dict, checkpoint: str | None, demos: str = "full"):
    """``(model, info)`` of a cell: trained as ``bench.run`` trains it, or loaded from
    ``checkpoint`` when that file exists (it must hold this cell, trained with this config).
    ``info``: the benchmark score, training wall seconds and the score's reference returns,
    saved with the weights. A new training is saved to ``checkpoint`` when one is named."""
    cell = {"task": task.name, "regime": regime, "N": n, "seed": seed, "config": config}
    if demos != "full":  # cells saved before subsampled demonstrations existed are full ones
        cell["demos"] = demos
    if checkpoint is not None and Path(checkpoint).exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False).get("bench_cell")
        if saved is None or saved["cell"] != cell:
            have = "no benchmark cell" if saved is None else {k: v for k, v in saved["cell"].items() if k != "config"}
            raise SystemExit(f"{checkpoint} holds {have}, not this cell ({task.name}, {regime}, {demos}, N={n}, seed={seed}) "
                             "with this config: name another --checkpoint path (nothing was overwritten)")
        return BiCQLML.load_from_checkpoint(checkpoint, map_location="cpu"), saved["info"]
    model, trainer, evaluation, wall = train_cell(task, regime, n, seed, config, demos)
    info = {"benchmark_score": evaluation.last["normalized_score"], "train_wall_s": wall,
            **{k: evaluation.last[k] for k in ("random_return", "expert_return")}}
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        state["bench_cell"] = {"cell": cell, "info": info}
        torch.save(state, checkpoint)
    return model, info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--task", required=True)
    parser.add_argument("--regime", choices=["expert-only", *OFFLINE], required=True)
    parser.add_argument("--demos", choices=sorted(SUBSAMPLE), default="full",
                        help="the cell's demonstrations: every transition (full) or every 20th (sub20)")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench" / "bicql.yaml"))
    parser.add_argument("--rules", nargs="*", default=DEFAULT_RULES)
    parser.add_argument("--first-seed", type=int, default=EVAL_SEEDS[0],
                        help="seed of the first evaluation episode (default: the protocol's)")
    parser.add_argument("--episodes", type=int, default=EVAL_SEEDS[1],
                        help="evaluation episodes per rule (default: the protocol's)")
    parser.add_argument("--precision", default="auto", help="trainer.precision, as bench.run's --precision")
    parser.add_argument("--checkpoint", help="load the trained cell from this file if it exists, else save it there")
    parser.add_argument("--run-checkpoints", metavar="DIR",
                        help="act on the weights bench.run kept for this cell in DIR (its --checkpoints) "
                             "instead of training")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        raise SystemExit(f"--episodes must be at least 1, got {args.episodes}")
    config = yaml.safe_load(Path(args.config).read_text())
    set_precision(config.setdefault("trainer", {}), args.precision)
    for rule in args.rules:  # before minutes of training
        parse_rule(rule)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    tasks = {t.name: t for t in read_manifest(args.manifest)}
    if args.task not in tasks:
        raise SystemExit(f"task {args.task!r} is not in {args.manifest} (it has {sorted(tasks)})")
    task = tasks[args.task]
    if args.run_checkpoints:
        model, info = run_model(task, args.regime, args.n, args.seed, config, args.demos, args.run_checkpoints)
    else:
        model, info = cell_model(task, args.regime, args.n, args.seed, config, args.checkpoint, args.demos)
    model.eval()
    wall = info["train_wall_s"]
    out = {"task": task.name, "regime": args.regime, "demos": args.demos, "N": args.n, "seed": args.seed,
           "train_wall_s": None if wall is None else round(wall, 1), "benchmark_score": info["benchmark_score"],
           "episodes": [args.first_seed, args.episodes]}
    first, episodes = args.first_seed, args.episodes
    random_return, expert_return = info["random_return"], info["expert_return"]
    for rule in args.rules:
        policy, moved = rule_policy(model, rule)
        envs = [task.make_env() for _ in range(episodes)]  # the manifest's env_kwargs too
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as RolloutEvaluation acts: the same floating-point path, the same picks
        try:
            returns = rollout_returns(envs, policy, list(range(first, first + episodes)))
        finally:
            torch.set_num_threads(threads)
            for env in envs:
                env.close()
        scores = [normalized_score(float(r), random_return, expert_return) for r in returns]
        if scores[0] is None:  # no reference returns: raw returns
            scores = [float(r) for r in returns]
        out[rule] = round(float(np.mean(scores)), 1)
        if episodes > 1:
            out[f"{rule} se"] = round(float(np.std(scores, ddof=1) / np.sqrt(episodes)), 1)
        if moved[1]:
            out[f"{rule} moved"] = round(moved[0] / moved[1], 2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
