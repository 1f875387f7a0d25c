"""bench.acting's rules are policies built beside the model's: the library's own acting."""

import numpy as np
import pytest
import torch

from bench.acting import main, parse_rule, rule_policy, sibling_policy, tilted_mode
from bicql_lightning import BiCQLML, TiltedPriorPolicy

BOX = dict(obs_kind="box", obs_dim=5, action_kind="box", action_dim=2, action_low=[-2.0, -1.0], action_high=[2.0, 1.0])


def make_model():
    torch.manual_seed(0)
    return BiCQLML(spaces=BOX, hidden_sizes=[16],
                   policy=TiltedPriorPolicy.config(temperature=0.05, num_candidates=8, hidden_sizes=[16]))


def test_prior_mode_is_the_priors_greedy_action_and_a_huge_temperature_plays_it_too():
    model = make_model()
    obs = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    mode = model.policy.acting_prior.mode(model.encoder(torch.as_tensor(obs))).numpy()
    policy, _ = rule_policy(model, "prior_mode")
    np.testing.assert_array_equal(policy(obs), mode)
    # The clipped prior's density over u peaks at its mean: without Q's pull the rule plays the mode.
    policy, moved = rule_policy(model, "tilted:1e9")
    np.testing.assert_allclose(policy(obs), mode, rtol=1e-6)
    assert moved == [0, 16]


def test_the_config_rule_is_act_and_counts_the_steps_q_moved():
    model = make_model()
    obs = np.random.default_rng(1).normal(size=(16, 5)).astype(np.float32)
    expected = model.act(obs)
    policy, moved = rule_policy(model, "config")
    np.testing.assert_array_equal(policy(obs), expected)
    mode = model.policy.acting_prior.mode(model.encoder(torch.as_tensor(obs))).numpy()
    assert moved == [int((np.abs(expected - mode).max(-1) > 1e-6).sum()), 16] and 0 < moved[0] < 16


def test_a_sibling_policy_shares_q_and_the_fitted_prior_and_leaves_the_model_alone():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sibling = sibling_policy(model, TiltedPriorPolicy, temperature=0.05, num_candidates=8, hidden_sizes=[16])
    obs = np.random.default_rng(2).normal(size=(8, 5)).astype(np.float32)
    np.testing.assert_array_equal(sibling.act(obs), model.act(obs))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.policy.temperature == 0.05


def test_the_choice_rule_plays_whichever_of_the_refit_mode_and_the_tilted_clone_q_ranks_higher():
    model = make_model()
    model.policy.relabeled.fill_(True)  # the refit's prior: another network, its own mode
    obs = np.random.default_rng(3).normal(size=(32, 5)).astype(np.float32)
    enc = model.encoder(torch.as_tensor(obs))
    with torch.no_grad():
        refit = model.policy.relabeled_prior.mode(enc)
        clone = sibling_policy(model, TiltedPriorPolicy, temperature=0.05, num_candidates=8, hidden_sizes=[16],
                               tilt_after_refit=True)
        clone.relabeled.fill_(False)
        clone = clone.actions(enc, True)
        q = torch.stack([model.q_net(enc, a.unsqueeze(1)).min(0).values.squeeze(1) for a in (refit, clone)], 1)
    policy, moved = rule_policy(model, "choice:0.05")
    got = torch.as_tensor(policy(obs))
    want = torch.where((q[:, 1] > q[:, 0]).unsqueeze(1), clone, refit)
    torch.testing.assert_close(got, want)
    assert 0 < moved[0] < 32 and moved[1] == 32  # moved: off the refit's mode, to the clone's pick


def test_rules_are_checked_before_anything_is_trained():
    assert parse_rule("tilted:3") == ("tilted", (3.0,))
    assert parse_rule("ascent:4:20") == ("ascent", (4.0, 20.0, 0.5))
    for bad, message in (("clipped:1:1", "unknown acting rule 'clipped:1:1'"), ("tilted", "unknown acting rule"),
                         ("tilted:0", "must be positive"), ("ascent:4:0", "needs T > 0"),
                         ("boltzmann:x", "must be numbers")):
        with pytest.raises(SystemExit, match=message):
            parse_rule(bad)
    # The command refuses a bad rule before it reads any data or trains.
    with pytest.raises(SystemExit, match="unknown acting rule 'bogus'"):
        main(["--manifest", "missing.json", "--data", "missing", "--task", "t", "--regime", "expert-only",
              "--n", "1", "--rules", "config", "bogus"])


def test_ascent_lands_on_the_tilted_gaussians_mode_for_a_linear_q():
    model = make_model()
    prior = model.policy.acting_prior
    enc = model.encoder(torch.as_tensor(np.random.default_rng(3).normal(size=(6, 5)).astype(np.float32)))
    slope = torch.tensor([0.3, -0.2])
    # Q linear in the unit action: the tilted Gaussian's mode is mu + sigma^2 * grad / T (inside the box).
    class Linear(torch.nn.Module):
        def forward(self, enc, actions):
            return (prior.to_unit(actions) @ slope).unsqueeze(0)
    shim = type("M", (), {"q_net": Linear()})()
    with torch.no_grad():
        mean, log_std = prior(enc)
    t = 50.0
    action, _ = tilted_mode(shim, prior, enc, t, steps=1, eta=1.0)
    expected = prior.from_unit((mean + (2 * log_std).exp() * slope / t).clamp(-1, 1))
    np.testing.assert_allclose(action.detach().numpy(), expected.numpy(), atol=1e-5)


class PendulumTask:  # the two datasets a with-mixed cell reads, on the tiny Pendulum data
    name = "pendulum"

    def __init__(self, tiny):
        self.ids = {"expert-n1": tiny.pendulum_expert, "mixed": tiny.pendulum_mixed}

    def dataset_id(self, kind):
        return self.ids[kind]


def kept_cell(tiny, tmp_path, demos="sub20", **policy_args):
    """A tiny BiCQL-ML with-mixed cell trained and kept where bench.run keeps its cells: ``(model, dm)``."""
    import lightning.pytorch as pl

    from bench.run import checkpoint_path
    from bicql_lightning import OfflineIRLDataModule

    pl.seed_everything(0, verbose=False)
    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), batch_size=16, batches_per_epoch=10,
                              expert_subsample=20 if demos == "sub20" else None)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    model = BiCQLML(hidden_sizes=[16], reward_hidden_sizes=[16], proposal_hidden_sizes=[16],
                    proposal_fit_steps=10, num_action_samples=4,
                    policy={"init_args": {"num_candidates": 4, "hidden_sizes": [16], "fit_steps": 10, **policy_args}})
    trainer.fit(model, dm)
    trainer.save_checkpoint(checkpoint_path(tmp_path, PendulumTask(tiny), "with-mixed", demos, 1, seed=0))
    return model, dm


def trained_under_the_old_default(path):
    """Drop ``relabel`` from a checkpoint's policy arguments, as checkpoints saved before it
    had a default of ``auto`` lack it: loading then applies the current default."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["hyper_parameters"]["policy"]["init_args"].pop("relabel")
    torch.save(state, path)


def test_rescore_refits_a_kept_cell_exactly_as_a_new_training_under_the_current_default_would(tiny, tmp_path):
    from bench.rescore import rescore
    from bench.run import EVAL_SEEDS, checkpoint_path
    from bicql_lightning import RolloutEvaluation

    task, config = PendulumTask(tiny), {"data": {"batch_size": 16}}
    evaluate = RolloutEvaluation(every_n_updates=0, episodes=EVAL_SEEDS[1], seed=EVAL_SEEDS[0]).evaluate_module
    refitted, dm = kept_cell(tiny, tmp_path, demos="sub20", relabel=True)  # trained with the refit
    want = evaluate(refitted.eval(), dm)
    # The same cell trained without it, then loaded under the current default (relabel: auto).
    kept_cell(tiny, tmp_path, demos="sub20", relabel=False)
    trained_under_the_old_default(checkpoint_path(tmp_path, task, "with-mixed", "sub20", 1, seed=0))
    row = {"task": "pendulum", "regime": "with-mixed", "demos": "sub20", "N": 1, "seed": 0, "algo": "bicql",
           "normalized_score": -7.0, "return": -1.0, "return_std": 0.0, "wall_s": 3.0, "reward_corr_mixed": 0.5}
    new, _ = rescore(row, task, str(tmp_path), config)
    # The checkpoint's stream is training's at the refit: the score is the refitted training's, exactly.
    assert new["normalized_score"] == want["normalized_score"] and new["return"] == want["return"]
    assert new["rescored"]["from_score"] == -7.0 and new["rescored"]["exact"] and new["policy_relabeled_share"] > 0
    assert (new["wall_s"], new["reward_corr_mixed"]) == (3.0, 0.5)  # the training's, unchanged
    # A refit the checkpoint holds already: nothing to rescore.
    kept_cell(tiny, tmp_path, demos="sub20", relabel=True)
    trained_under_the_old_default(checkpoint_path(tmp_path, task, "with-mixed", "sub20", 1, seed=0))
    assert rescore(row, task, str(tmp_path), config) == (None, {})
    # Whole demonstrations refitted under relabel: true: the current default drops that refit,
    # and the same weights act from D_E's prior, tilted by Q. The stream is past the refit, so
    # a rule that draws (relabel: heldout) would be a later draw: the row says it is not exact.
    trained, dm = kept_cell(tiny, tmp_path, demos="full", relabel=True)
    trained_under_the_old_default(checkpoint_path(tmp_path, task, "with-mixed", "full", 1, seed=0))
    new, metrics = rescore({**row, "demos": "full"}, task, str(tmp_path), config)
    assert new["rescored"]["exact"] is False and metrics == {"policy/relabeled_share": 0.0}
    trained.policy.relabeled.fill_(False)
    trained.policy.revision += 1
    assert new["normalized_score"] == evaluate(trained.eval(), dm)["normalized_score"]


def test_under_relabel_heldout_a_whole_demonstration_cell_acts_with_the_prior_that_predicts_held_out_pairs_better(
        tiny, tmp_path):
    model, _ = kept_cell(tiny, tmp_path, demos="full", relabel="heldout")
    logged = model.trainer.callback_metrics
    expert, refit = float(logged["policy/heldout_error_expert"]), float(logged["policy/heldout_error_refit"])
    assert expert > 0 and refit > 0
    assert bool(model.policy.relabeled) == (refit < expert)
    assert (model.policy.acting_prior is model.policy.relabeled_prior) == (refit < expert)


def test_the_weights_a_bench_run_cell_kept_are_acted_on_without_training(tiny, tmp_path):
    from bench.acting import run_model

    trained, dm = kept_cell(tiny, tmp_path)
    model, info = run_model(PendulumTask(tiny), "with-mixed", 1, 0, {"data": {"batch_size": 16}}, "sub20", str(tmp_path))
    # The same references from a data module the caller passes in (read once, not twice).
    assert run_model(PendulumTask(tiny), "with-mixed", 1, 0, {}, "sub20", str(tmp_path), data=dm)[1] == info
    loaded, saved = model.state_dict(), trained.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert bool(model.policy.relabeled)  # the refitted prior the row's controller acted with
    assert None not in dm.ref_scores and (info["random_return"], info["expert_return"]) == dm.ref_scores
    assert info["benchmark_score"] is None  # the score is the run's results row, not the checkpoint's
    with pytest.raises(SystemExit, match=r"bicql_pendulum_with-mixed_sub20_n1_seed1.ckpt does not exist"):
        run_model(PendulumTask(tiny), "with-mixed", 1, 1, {}, "sub20", str(tmp_path))


def test_prior_choice_scores_both_priors_on_held_out_demonstrations_and_leaves_the_cell_alone(tiny, tmp_path):
    from bench.acting import run_model
    from bench.prior_choice import heldout_fits

    _, dm = kept_cell(tiny, tmp_path, demos="full")
    model = run_model(PendulumTask(tiny), "with-mixed", 1, 0, {}, "full", str(tmp_path))[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = heldout_fits(model, dm, seed=0, fit_steps=20)
    assert set(first) == {f"{p}_heldout_{m}" for p in ("expert_prior", "refit") for m in ("loglik", "mode_mse")}
    assert all(np.isfinite(v) for v in first.values()) and first["refit_heldout_mode_mse"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # From the kept checkpoint again (its random stream too): the same split, fits and scores.
    again = run_model(PendulumTask(tiny), "with-mixed", 1, 0, {}, "full", str(tmp_path))[0]
    assert heldout_fits(again, dm, seed=0, fit_steps=20) == first


@pytest.mark.parametrize("demos, refitted", [("sub20", "relabeled_prior"), ("full", "prior")])
def test_a_refit_draw_fits_only_the_acting_prior_again_and_the_same_draw_gives_the_same_controller(
        tiny, tmp_path, demos, refitted):
    from bench.acting import run_model
    from bench.refit_draws import draw

    _, dm = kept_cell(tiny, tmp_path, demos=demos)

    def load():
        return run_model(PendulumTask(tiny), "with-mixed", 1, 0, {"data": {"batch_size": 16}}, demos, str(tmp_path),
                         data=dm)[0]

    def prior(model):
        return torch.cat([p.flatten() for p in getattr(model.policy, refitted).parameters()])

    first, again, other = load(), load(), load()
    before = prior(first).clone()
    others = {k: v.clone() for k, v in first.state_dict().items() if f"policy.{refitted}." not in k}
    score, _ = draw(first, dm, 0, "constant")
    assert draw(again, dm, 0, "constant")[0] == score
    draw(other, dm, 1, "constant")
    # Sparse demonstrations act from D's refit, whole ones from D_E's prior: that one is fitted
    # again, the same way for the same draw and otherwise for another; nothing else moves.
    assert torch.equal(prior(first), prior(again)) and not torch.equal(prior(first), prior(other))
    assert not torch.equal(prior(first), before)
    assert all(torch.equal(first.state_dict()[k], v) for k, v in others.items())
    assert bool(first.policy.relabeled) == (demos == "sub20")


def test_the_averaged_prior_is_one_gaussian_with_its_members_mean_and_log_std():
    from bench.refit_draws import AveragedGaussian
    from bicql_lightning import GaussianPolicy
    from test_module import BOX

    torch.manual_seed(0)
    members = [GaussianPolicy(BOX, [8], "clipped") for _ in range(3)]
    averaged = AveragedGaussian(members)
    obs = torch.randn(5, BOX["obs_dim"])
    mean, log_std = averaged(obs)
    assert torch.allclose(mean, sum(m(obs)[0] for m in members) / 3)
    assert torch.allclose(log_std, sum(m(obs)[1] for m in members) / 3)
    assert torch.allclose(averaged.mode(obs), averaged.from_unit(mean.clamp(-1, 1)))
