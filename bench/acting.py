"""Compare BiCQL-ML's Box acting rules on the same trained weights.

    python -m bench.acting --manifest ../shared/experts/experts.json --data DATA \\
        --task hopper --regime with-mixed --n 10 --seed 0

Trains one benchmark cell exactly as ``bench.run`` does (``configs/bench/bicql.yaml``;
the rule ``config`` is the config's own, so its score is the cell's benchmark score), then
evaluates each acting rule on those weights with the protocol's 10 deterministic episodes.
A rule is ``proposal_mode``, ``prior_mode``, ``offline_prior_mode`` (the greedy action of
the proposal, of the ``clipped_gaussian`` prior fitted to D_E or of the prior that
``act_prior_data`` ``both`` or ``expert_like`` fits to D; Q unused) or
``PRIOR:T:SCALE[:DATA]``: ``act()`` with ``act_prior`` = PRIOR (``proposal`` or
``clipped_gaussian``), ``act_temperature`` = T and ``act_candidate_scale`` = SCALE, and for
a model with two priors DATA = ``expert``, ``offline`` or ``both``: tilt D_E's prior alone,
D's alone, or both (generalised policy improvement, ``act_prior_data: both``'s rule), or
``ascent:T:K[:ETA]``: the mode of prior(a|s)·exp(Q(s,a)/T) found by K preconditioned ascent
steps from the prior's mode (:func:`tilted_mode`; the prior the model acts with), kept where it
scores above the best of the config's candidates (an experiment, not in the module). For
the Q-tilted rules it also reports the share of steps where the action moved off the (first)
prior's greedy one. Prints one JSON line.

Tuning a rule on the protocol's own evaluation episodes (seeds 10000-10009) fits it to them;
``--first-seed 20000 --episodes 30`` scores every rule on other episodes instead, and each
rule's standard error over episodes (``"RULE se"``) says which differences are larger than
the episodes' spread. ``--checkpoint PATH`` saves the trained cell there (a Lightning
checkpoint that also names its cell) and, when PATH exists, loads it instead of training:
one training, any number of rule comparisons. A checkpoint of another cell is refused.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.datasets import read_manifest
from bench.run import EVAL_SEEDS, ROOT, set_precision, train_cell
from bicql_lightning import BiCQLML
from bicql_lightning.callbacks import normalized_score, rollout_returns

DEFAULT_RULES = ["config", "proposal_mode", "prior_mode", "proposal:10:0.5", "clipped_gaussian:1:1",
                 "clipped_gaussian:10:0.5"]


GREEDY_RULES = ("config", "proposal_mode", "prior_mode", "offline_prior_mode")


def parse_ascent(rule: str) -> tuple[float, int, float] | None:
    """``ascent:T:K[:ETA]`` -> ``(T, K, ETA)``; ``None`` for any other rule."""
    parts = rule.split(":")
    if parts[0] != "ascent":
        return None
    try:
        t_act, steps, eta = float(parts[1]), int(parts[2]), float(parts[3]) if len(parts) == 4 else 0.5
    except (IndexError, ValueError):
        raise SystemExit(f"acting rule {rule!r}: use ascent:T:K[:ETA] (e.g. ascent:4:20:0.5)") from None
    if len(parts) > 4 or t_act <= 0 or steps < 1 or not 0 < eta <= 1:
        raise SystemExit(f"acting rule {rule!r}: ascent:T:K[:ETA] needs T > 0, K >= 1 and 0 < ETA <= 1")
    return t_act, steps, eta


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
    for _ in range(steps):
        u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            q, _, _ = objective(u)
            (grad,) = torch.autograd.grad(q.sum(), u)
        u = u.detach() + eta * (var * grad / t_act - (u.detach() - mean))
    with torch.no_grad():
        q, log_prior, action = objective(u)
    return action, q / t_act + log_prior


def parse_rule(rule: str) -> tuple[str, float, float, str | None]:
    """``PRIOR:T:SCALE[:DATA]`` -> its parts, checked as the module's constructor checks them."""
    parts = rule.split(":")
    if (len(parts) not in (3, 4) or parts[0] not in ("proposal", "clipped_gaussian")
            or (len(parts) == 4 and (parts[0] != "clipped_gaussian" or parts[3] not in ("expert", "offline", "both")))):
        raise SystemExit(f"unknown acting rule {rule!r}: use {', '.join(GREEDY_RULES)} or PRIOR:T:SCALE[:DATA] "
                         "with PRIOR proposal or clipped_gaussian and DATA (clipped_gaussian only) expert, offline "
                         "or both (e.g. clipped_gaussian:1:1)")
    t_act, scale = float(parts[1]), float(parts[2])
    if t_act <= 0 or scale <= 0:
        raise SystemExit(f"acting rule {rule!r}: the temperature and the candidate scale must be positive")
    return parts[0], t_act, scale, (parts[3] if len(parts) == 4 else None)


@contextmanager
def acting_priors(model, data: str | None):
    """``act()`` tilts the expert prior alone (``expert``), the offline one alone (``offline``)
    or both (``both``, the act_prior_data="both" rule) inside the block; ``None``: as trained."""
    if data is None:
        yield
        return
    saved, saved_data = model.behavior_prior, model.hparams.act_prior_data
    try:
        if data == "offline":
            model.behavior_prior = model.offline_prior
        model.offline_prior_used.fill_(data == "both")
        model.hparams.act_prior_data = "both"  # GPI over both where both are used
        yield
    finally:
        model.behavior_prior, model.hparams.act_prior_data = saved, saved_data
        model.offline_prior_used.fill_(True)


def rule_policy(model, rule: str):
    """``(policy, moved)``: a function of stacked raw observations, and a counter
    ``[steps moved off the prior's greedy action, steps]`` it updates."""
    moved = [0, 0]
    if rule in ("proposal_mode", "prior_mode", "offline_prior_mode"):
        net = {"proposal_mode": model.proposal, "prior_mode": model.behavior_prior,
               "offline_prior_mode": model.offline_prior}[rule]
        if net is None:
            raise SystemExit("offline_prior_mode needs a model trained with act_prior_data: both or expert_like")

        @torch.no_grad()
        def greedy(obs):
            return net.mode(model.encoder(torch.as_tensor(obs, device=model.device))).cpu().numpy()
        return greedy, moved
    ascent = parse_ascent(rule)
    if ascent is not None:
        t_act, steps, eta = ascent
        prior = (model.offline_prior if model.offline_prior is not None and bool(model.offline_prior_used)
                 else model.behavior_prior)

        def ascended(obs):
            enc = model.encoder(torch.as_tensor(obs, device=model.device))
            with torch.no_grad():
                gen = torch.Generator(device=enc.device).manual_seed(0)
                cands, log_prior, log_prop = prior.candidates(enc, model.hparams.num_act_candidates, 1.0, generator=gen)
                q = model.q_net(enc, cands).min(0).values
                logits = q / t_act + log_prior
                best = logits.argmax(1)
                rows = torch.arange(cands.shape[0])
                sampled, sampled_f = cands[rows, best], logits[rows, best]
            action, f = tilted_mode(model, prior, enc, t_act, steps, eta)
            action = torch.where((f > sampled_f).unsqueeze(1), action, sampled)
            mode = prior.mode(enc)
            moved[0] += int(((action - mode).abs().max(-1).values > 1e-6).sum())
            moved[1] += len(obs)
            return action.detach().cpu().numpy()
        return ascended, moved
    data = None
    if rule != "config":
        prior, t_act, scale, data = parse_rule(rule)
        if data is not None and (model.offline_prior is None or not bool(model.offline_prior_used)):
            raise SystemExit(f"acting rule {rule!r} needs a model trained with act_prior_data: both or expert_like on data "
                             "where D holds more than D_E")
        model.hparams.act_prior, model.hparams.act_temperature = prior, t_act
        model.hparams.act_candidate_scale = scale
    base = model.proposal if model.hparams.act_prior == "proposal" else model.behavior_prior

    @torch.no_grad()
    def policy(obs):
        with acting_priors(model, data):
            action = model.act(obs)
        mode = base.mode(model.encoder(torch.as_tensor(obs, device=model.device))).cpu().numpy()
        moved[0] += int((np.abs(action - mode).max(-1) > 1e-6).sum())
        moved[1] += len(obs)
        return action
    return policy, moved


def cell_model(task, regime: str, n: int, seed: int, config: dict, checkpoint: str | None):
    """``(model, info)`` of a cell: trained as ``bench.run`` trains it, or loaded from
    ``checkpoint`` when that file exists (it must hold this cell, trained with this config).
    ``info``: the benchmark score, training wall seconds and the score's reference returns,
    saved with the weights. A new training is saved to ``checkpoint`` when one is named."""
    cell = {"task": task.name, "regime": regime, "N": n, "seed": seed, "config": config}
    if checkpoint is not None and Path(checkpoint).exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False).get("bench_cell")
        if saved is None or saved["cell"] != cell:
            have = "no benchmark cell" if saved is None else {k: v for k, v in saved["cell"].items() if k != "config"}
            raise SystemExit(f"{checkpoint} holds {have}, not this cell ({task.name}, {regime}, N={n}, seed={seed}) "
                             "with this config: name another --checkpoint path (nothing was overwritten)")
        return BiCQLML.load_from_checkpoint(checkpoint, map_location="cpu"), saved["info"]
    model, trainer, evaluation, wall = train_cell(task, regime, n, seed, config)
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
    parser.add_argument("--regime", choices=["expert-only", "with-mixed"], required=True)
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
    args = parser.parse_args(argv)
    if args.episodes < 1:
        raise SystemExit(f"--episodes must be at least 1, got {args.episodes}")
    config = yaml.safe_load(Path(args.config).read_text())
    set_precision(config.setdefault("trainer", {}), args.precision)
    two_priors = (config["model"]["init_args"].get("act_prior_data") in ("both", "expert_like")
                  and args.regime == "with-mixed")
    for rule in args.rules:  # before minutes of training
        if parse_ascent(rule) is not None:
            continue
        needs_two = rule == "offline_prior_mode" or (rule not in GREEDY_RULES and parse_rule(rule)[3] is not None)
        if needs_two and not two_priors:
            raise SystemExit(f"acting rule {rule!r} needs act_prior_data: both or expert_like in the config and --regime "
                             "with-mixed (two priors)")
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    tasks = {t.name: t for t in read_manifest(args.manifest)}
    if args.task not in tasks:
        raise SystemExit(f"task {args.task!r} is not in {args.manifest} (it has {sorted(tasks)})")
    task = tasks[args.task]
    if config["model"]["init_args"].get("act_prior") != "clipped_gaussian":
        raise SystemExit("bench.acting compares rules that need the clipped_gaussian prior: set "
                         "act_prior: clipped_gaussian in the config")
    model, info = cell_model(task, args.regime, args.n, args.seed, config, args.checkpoint)
    model.eval()
    out = {"task": task.name, "regime": args.regime, "N": args.n, "seed": args.seed,
           "train_wall_s": round(info["train_wall_s"], 1), "benchmark_score": info["benchmark_score"],
           "episodes": [args.first_seed, args.episodes]}
    first, episodes = args.first_seed, args.episodes
    random_return, expert_return = info["random_return"], info["expert_return"]
    configured = {k: model.hparams[k] for k in ("act_prior", "act_temperature", "act_candidate_scale")}
    for rule in args.rules:
        model.hparams.update(configured)
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
