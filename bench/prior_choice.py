"""Would held-out demonstrations tell which prior to act with? (an experiment, not the library)

    python -m bench.prior_choice --manifest ../shared/experts/experts.json --data DATA \\
        --run-checkpoints CK --cells hopper:with-medium:full:0 halfcheetah:with-mixed:sub20:2

Where D holds more than D_E, the default controller acts with the advantage-weighted refit
of the prior to D. With one full demonstration and medium data that refit plays the medium
policy (hopper: 20) where D_E's own prior plays the expert (100). This asks whether the
demonstrations themselves can say which prior to trust: for each kept ``bench.run`` cell
(``--run-checkpoints``, as ``bench.acting``), a fifth of D_E's pairs is held out (seeded by
the cell's seed), D_E's prior is fitted on the rest and the refit on D without them (D's
weights as the default refit gives them, the held-out pairs weightless), both from the same
initialisation, and each is scored on the held-out expert actions: mean log-likelihood and
the mode's mean squared error (the action box's units). It also plays D_E's own prior,
tilted as when D = D_E, on the cell's weights (the benchmark's 10 episodes), and with
``--play-refit`` also the refit to all of D (forced where ``relabel: auto`` keeps D_E's prior),
from the module's stream after this tool's own pass over the advantages drew from it: a draw
of the refit, not the one a training makes (``bench.rescore`` replays that one). One JSON
line per cell. Nothing of the checkpoints is changed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.acting import run_model
from bench.datasets import read_manifest
from bench.run import EVAL_SEEDS, ROOT, cell_data
from bicql_lightning.callbacks import normalized_score, refit_policy, rollout_returns
from bicql_lightning.densities import GaussianPolicy, fit_density
from bicql_lightning.policies import advantage_weights

HELD_OUT = 5  # one pair in five


def heldout_fits(model, dm, seed: int, fit_steps: int | None = None) -> dict[str, float]:
    """Held-out log-likelihood and mode error of D_E's prior and of the refit (module doc)."""
    policy = model.policy
    steps = policy.fit_steps if fit_steps is None else fit_steps
    obs_e, act_e = dm.pairs("expert")
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(obs_e), dtype=torch.bool)
    held[torch.randperm(len(obs_e), generator=generator)[: max(1, len(obs_e) // HELD_OUT)]] = True
    n = dm.num_transitions("offline")
    chunk = 1 << 14
    advantage = torch.cat([model.soft_advantages(*dm.pairs("offline", slice(i, i + chunk))) for i in range(0, n, chunk)])
    weights = advantage_weights(advantage, policy.advantage_scale)
    weights[dm.expert_in_offline().nonzero().squeeze(1)[held]] = 0.0  # D's copies of the held-out pairs
    out = {}
    for name, (obs, actions, w) in {"expert_prior": (obs_e[~held], act_e[~held], None),
                                    "refit": (*dm.pairs("offline"), weights)}.items():
        torch.manual_seed(seed)
        net = GaussianPolicy(model.spaces, policy.hidden_sizes, "clipped").requires_grad_(False)
        fit_density(net, lambda o, a, net=net: net.loss(o, a)[0], model.encoder, obs, actions, steps, policy.lr,
                    torch.Generator().manual_seed(seed), weights=w)
        with torch.no_grad():
            enc = model.encoder(obs_e[held])
            out[f"{name}_heldout_loglik"] = float(net.log_prob(enc, act_e[held]).mean())
            out[f"{name}_heldout_mode_mse"] = float((net.mode(enc) - act_e[held]).pow(2).mean())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets")
    parser.add_argument("--run-checkpoints", required=True, metavar="DIR", help="bench.run's --checkpoints")
    parser.add_argument("--cells", nargs="+", required=True, metavar="TASK:REGIME:DEMOS:SEED")
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench" / "bicql.yaml"))
    parser.add_argument("--play-refit", action="store_true", help="also play the refit to all of D")
    args = parser.parse_args(argv)
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    tasks = {t.name: t for t in read_manifest(args.manifest)}
    config = yaml.safe_load(Path(args.config).read_text())
    torch.set_num_threads(1)  # as RolloutEvaluation acts
    for cell in args.cells:
        try:
            name, regime, demos, seed = cell.split(":")
            task, seed = tasks[name], int(seed)
        except (ValueError, KeyError):
            raise SystemExit(f"--cells {cell!r}: expected TASK:REGIME:DEMOS:SEED with a task of {args.manifest} "
                             "(e.g. hopper:with-medium:full:0)") from None
        dm = cell_data(task, regime, 1, seed, config, demos)
        dm.setup("fit")
        model, info = run_model(task, regime, 1, seed, config, demos, args.run_checkpoints, data=dm)
        model.eval()
        out = {"task": name, "regime": regime, "demos": demos, "N": 1, "seed": seed,
               "expert_pairs": dm.num_transitions("expert"),
               **{k: round(v, 4) for k, v in heldout_fits(model, dm, seed).items()}}
        envs = [task.make_env() for _ in range(EVAL_SEEDS[1])]

        def play() -> float:
            returns = rollout_returns(envs, model.act, list(range(EVAL_SEEDS[0], EVAL_SEEDS[0] + EVAL_SEEDS[1])))
            return round(float(np.mean(
                [normalized_score(float(r), info["random_return"], info["expert_return"]) for r in returns])), 1)

        model.policy.relabeled.fill_(False)  # act from D_E's own prior, tilted, as when D = D_E
        model.policy.revision += 1
        out["expert_prior_tilted_score"] = play()
        if args.play_refit:
            model.policy.relabel = True
            refit_policy(model, dm)
            out["refit_score"] = play()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
