"""bench.acting's rules are the library's own acting under the named settings."""

from types import SimpleNamespace

import numpy as np
import torch

import pytest

import bench.acting
from bench.acting import cell_model, main, parse_ascent, parse_rule, rule_policy, tilted_mode
from bicql_lightning import BiCQLML
from test_training import tiny_fit

BOX = dict(obs_kind="box", obs_dim=5, action_kind="box", action_dim=2, action_low=[-2.0, -1.0], action_high=[2.0, 1.0])


def make_model():
    torch.manual_seed(0)
    return BiCQLML(spaces=BOX, hidden_sizes=[16], num_act_candidates=8, act_policy="proposal_weighted",
                   act_prior="clipped_gaussian", act_temperature=0.05)


def test_greedy_rules_are_the_modes_and_a_huge_temperature_plays_the_priors_mode():
    model = make_model()
    obs = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    enc = model.encoder(torch.as_tensor(obs))
    for rule, net in (("proposal_mode", model.proposal), ("prior_mode", model.behavior_prior)):
        policy, _ = rule_policy(model, rule)
        np.testing.assert_array_equal(policy(obs), net.mode(enc).numpy())
    # The clipped prior's density over u peaks at its mean: without Q the rule plays the mode.
    policy, moved = rule_policy(model, "clipped_gaussian:1e9:1")
    np.testing.assert_allclose(policy(obs), model.behavior_prior.mode(enc).numpy(), rtol=1e-6)
    assert moved == [0, 16]


def test_the_config_rule_is_act_and_counts_the_steps_q_moved():
    model = make_model()
    obs = np.random.default_rng(1).normal(size=(16, 5)).astype(np.float32)
    expected = model.act(obs)
    policy, moved = rule_policy(model, "config")
    np.testing.assert_array_equal(policy(obs), expected)
    mode = model.behavior_prior.mode(model.encoder(torch.as_tensor(obs))).numpy()
    assert moved == [int((np.abs(expected - mode).max(-1) > 1e-6).sum()), 16] and 0 < moved[0] < 16


def test_rules_are_checked_before_anything_is_trained():
    assert parse_rule("clipped_gaussian:3:0.5") == ("clipped_gaussian", 3.0, 0.5, None)
    assert parse_rule("clipped_gaussian:3:0.5:both") == ("clipped_gaussian", 3.0, 0.5, "both")
    with pytest.raises(SystemExit, match="unknown acting rule"):
        parse_rule("proposal:1:1:both")
    with pytest.raises(SystemExit, match="unknown acting rule 'clipped:1:1'"):
        parse_rule("clipped:1:1")
    with pytest.raises(SystemExit, match="must be positive"):
        parse_rule("proposal:0:1")
    # The command refuses a bad rule before it reads any data or trains.
    with pytest.raises(SystemExit, match="unknown acting rule 'bogus'"):
        main(["--manifest", "missing.json", "--data", "missing", "--task", "t", "--regime", "expert-only",
              "--n", "1", "--rules", "config", "bogus"])
    # Rules that tilt one of two priors need two: act_prior_data both and mixed data in D.
    for rule in ("offline_prior_mode", "clipped_gaussian:1:1:offline"):
        with pytest.raises(SystemExit, match="needs act_prior_data: both or expert_like in the config and --regime with-mixed"):
            main(["--manifest", "missing.json", "--data", "missing", "--task", "t", "--regime", "expert-only",
                  "--n", "1", "--rules", rule])


def test_a_saved_cell_is_loaded_instead_of_trained_and_acts_as_trained(tiny, tmp_path, monkeypatch):
    kwargs = dict(act_policy="proposal_weighted", act_prior="clipped_gaussian", act_prior_fit_steps=50)
    trained, dm, trainer = tiny_fit(tiny.ids("pendulum"), tmp_path / "fit", model_kwargs=kwargs)
    evaluation = SimpleNamespace(last={"normalized_score": 42.0, "random_return": -1200.0, "expert_return": -150.0})
    calls = []
    monkeypatch.setattr(bench.acting, "train_cell", lambda *cell: calls.append(cell) or (trained, trainer, evaluation, 7.0))
    task, config = SimpleNamespace(name="pendulum"), {"model": {"init_args": kwargs}}
    path = tmp_path / "cell.ckpt"

    model, info = cell_model(task, "with-mixed", 1, 0, config, str(path))
    assert model is trained and len(calls) == 1
    assert info == {"benchmark_score": 42.0, "train_wall_s": 7.0, "random_return": -1200.0, "expert_return": -150.0}
    saved = path.read_bytes()

    loaded, loaded_info = cell_model(task, "with-mixed", 1, 0, config, str(path))
    assert len(calls) == 1 and loaded_info == info  # not trained again
    raw = dm.expert_store.tensors["obs"][:32].numpy()
    np.testing.assert_array_equal(loaded.act(raw), trained.act(raw))

    # Another cell, or the same cell under another config, is refused and the file kept.
    for cell, cfg in (((task, "with-mixed", 1, 1), config), ((task, "with-mixed", 1, 0), {"model": {}})):
        with pytest.raises(SystemExit, match=r"holds \{'task': 'pendulum', 'regime': 'with-mixed', 'N': 1, 'seed': 0\}, "
                                             r"not this cell"):
            cell_model(*cell, cfg, str(path))
    assert path.read_bytes() == saved and len(calls) == 1


def test_episode_count_is_checked_before_anything_is_trained():
    with pytest.raises(SystemExit, match="--episodes must be at least 1, got 0"):
        main(["--manifest", "missing.json", "--data", "missing", "--task", "t", "--regime", "expert-only",
              "--n", "1", "--episodes", "0"])


class LinearQ(torch.nn.Module):
    """Twin Q(s, a) = g . a, the same for both twins: ``(2, B, M)``."""

    def __init__(self, g):
        super().__init__()
        self.g = torch.nn.Parameter(torch.as_tensor(g, dtype=torch.float32))

    def forward(self, obs, actions):
        return (actions * self.g).sum(-1).expand(2, -1, -1)


def test_ascent_lands_on_the_tilted_gaussians_mode_for_a_linear_q():
    model = make_model()
    model.q_net = LinearQ([0.3, -0.2])
    obs = torch.as_tensor(np.random.default_rng(2).normal(size=(8, 5)).astype(np.float32))
    enc = model.encoder(obs)
    prior = model.behavior_prior
    with torch.no_grad():
        mean, log_std = prior(enc)
    # Q(a(u)) = g . (c + h u) inside the box, so the mode of N(u; mu, s^2) exp(Q/T) is mu + s^2 h g / T.
    t_act = 4.0
    expected_u = mean + (2 * log_std).exp() * prior.action_half * model.q_net.g.detach() / t_act
    assert expected_u.abs().max() < 1.0  # inside the box: no face in the way
    action, score = tilted_mode(model, prior, enc, t_act, steps=40, eta=0.5)
    torch.testing.assert_close(action, prior.from_unit(expected_u), rtol=0.0, atol=1e-5)
    # The tilted log density there beats the prior's mode's.
    with torch.no_grad():
        mode = prior.from_unit(mean.clamp(-1, 1))
        at_mode = (mode * model.q_net.g).sum(-1) / t_act + (-log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
    assert (score > at_mode).all()


def test_the_ascent_rule_plays_the_priors_mode_without_q_and_is_checked_before_training():
    model = make_model()
    obs = np.random.default_rng(3).normal(size=(16, 5)).astype(np.float32)
    policy, moved = rule_policy(model, "ascent:1e9:5")
    np.testing.assert_allclose(policy(obs), model.behavior_prior.mode(model.encoder(torch.as_tensor(obs))).numpy(),
                               rtol=0.0, atol=1e-6)
    assert parse_ascent("ascent:4:20") == (4.0, 20, 0.5) and parse_ascent("ascent:2:5:1") == (2.0, 5, 1.0)
    assert parse_ascent("clipped_gaussian:1:1") is None
    for bad in ("ascent:4", "ascent:0:5", "ascent:4:0", "ascent:4:5:2"):
        with pytest.raises(SystemExit, match="ascent:T:K"):
            main(["--manifest", "missing.json", "--data", "missing", "--task", "t", "--regime", "expert-only",
                  "--n", "1", "--rules", "config", bad])
