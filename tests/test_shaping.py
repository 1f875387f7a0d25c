"""The learned reward shaped by the learned soft value (``bicql_lightning.shaping``)."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from bicql_lightning import (BiCQLML, BoltzmannPolicy, LearnedRewardWrapper, OfflineIRLDataModule,
                             PolicyLogLikelihood, RankedReward, RewardNet, ShapedReward, load_transitions)
from bicql_lightning.policies import GREEDY_NOISE_SEED
from bicql_lightning.shaping import SoftAdvantage, SoftValuePotential

TINY = dict(hidden_sizes=[16, 16], reward_hidden_sizes=[16, 16], proposal_hidden_sizes=[16, 16],
            proposal_fit_steps=10, num_action_samples=4,
            policy={"init_args": {"num_candidates": 4, "hidden_sizes": [16], "fit_steps": 10}})


def _checkpoint(tiny_data, tmp_path_factory, env: str) -> Path:
    path = tmp_path_factory.mktemp(f"shaping_{env}") / "bicql.ckpt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tiny_data.root))
        pl.seed_everything(0, verbose=False)
        dm = OfflineIRLDataModule(*tiny_data.ids(env), batch_size=16, batches_per_epoch=20, val_size=16)
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
        trainer.fit(BiCQLML(**TINY), dm)
        trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def pendulum_ckpt(tiny_data, tmp_path_factory) -> Path:
    return _checkpoint(tiny_data, tmp_path_factory, "pendulum")


@pytest.fixture(scope="module")
def cartpole_ckpt(tiny_data, tmp_path_factory) -> Path:
    return _checkpoint(tiny_data, tmp_path_factory, "cartpole")


def test_shaped_reward_is_the_reward_plus_the_discounted_change_of_potential(pendulum_ckpt):
    shaped = ShapedReward.from_checkpoint(pendulum_ckpt)
    reward_net = RewardNet.from_checkpoint(pendulum_ckpt)
    rng = np.random.default_rng(0)
    s, s2 = rng.normal(size=(2, 3)).astype(np.float32)
    a = np.array([0.7], np.float32)
    r = float(reward_net.predict(s, a))
    phi, phi2 = float(shaped.potential.predict(s)), float(shaped.potential.predict(s2))
    assert shaped.gamma == pytest.approx(0.99)
    assert abs(phi - phi2) > 1e-4  # the check below would not see a constant potential
    assert float(shaped.predict(s, a, s2, np.asarray(False))) == pytest.approx(r + 0.99 * phi2 - phi, rel=1e-6)
    # Termination: nothing follows, so the next state's potential is not paid.
    assert float(shaped.predict(s, a, s2, np.asarray(True))) == pytest.approx(r - phi, rel=1e-6)
    # Batched transitions get the same rewards as one at a time.
    batch = shaped.predict(np.stack([s, s2]), np.stack([a, -a]), np.stack([s2, s]), np.array([False, True]))
    single = [float(shaped.predict(s, a, s2, np.asarray(False))), float(shaped.predict(s2, -a, s, np.asarray(True)))]
    np.testing.assert_allclose(batch, single, rtol=1e-5)


def test_box_potential_is_a_fixed_function_of_the_state_whatever_the_batch(pendulum_ckpt):
    potential = ShapedReward.from_checkpoint(pendulum_ckpt).potential
    obs = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    batched = potential.predict(obs)
    alone = np.array([potential.predict(o) for o in obs])
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(potential.predict(obs), batched)  # no fresh noise per call


def test_box_potential_is_the_sampled_soft_maximum_of_the_twins_minimum(pendulum_ckpt):
    module = BiCQLML.load_from_checkpoint(pendulum_ckpt, map_location="cpu")
    potential = SoftValuePotential(module, num_samples=8, seed=3)
    obs = torch.tensor(np.random.default_rng(2).normal(size=(4, 3)), dtype=torch.float32)
    encoded = module.encoder(obs)
    noise = module.proposal.draw_noise(1, 8, torch.Generator().manual_seed(3), device="cpu")
    actions, log_q = module.proposal.sample(encoded, 8, noise=tuple(x.expand(4, -1, -1) for x in noise))
    with torch.no_grad():
        q = module.q_net(encoded, actions).float().min(0).values  # (4, 8)
    t = module.hparams.temperature
    by_hand = t * (torch.logsumexp(q / t - log_q, dim=1) - np.log(8))
    torch.testing.assert_close(potential(obs), by_hand)


def _cartpole_states_and_min_q(ckpt, seed: int):
    """A CartPole checkpoint's module, six states near the start, its twins' minimum Q there ``(6, 2)``."""
    module = BiCQLML.load_from_checkpoint(ckpt, map_location="cpu")
    obs = torch.tensor(np.random.default_rng(seed).normal(size=(6, 4)) * 0.1, dtype=torch.float32)
    with torch.no_grad():
        q = module.q_net(module.encoder(obs)).float().min(0).values
    return module, obs, q


def test_discrete_potential_is_the_exact_soft_maximum(cartpole_ckpt):
    module, obs, q = _cartpole_states_and_min_q(cartpole_ckpt, seed=3)
    t = module.hparams.temperature
    torch.testing.assert_close(SoftValuePotential(module)(obs), t * torch.logsumexp(q / t, dim=1))


def _discounted(rewards, gamma):
    return float(sum(gamma ** i * r for i, r in enumerate(rewards)))


@pytest.mark.parametrize("env_id, ckpt", [("CartPole-v1", "cartpole_ckpt"), ("Pendulum-v1", "pendulum_ckpt")])
def test_shaping_moves_an_episodes_discounted_return_by_the_potentials_at_its_ends(env_id, ckpt, request):
    """Whatever the actions: -Phi(s_0) for an episode that terminates (CartPole, random
    actions), -Phi(s_0) + gamma^T Phi(s_T) for one cut by the time limit (Pendulum): so
    shaping ranks policies as the learned reward does."""
    path = request.getfixturevalue(ckpt)
    shaped = ShapedReward.from_checkpoint(path)
    env = gym.make(env_id, max_episode_steps=60)
    plain, wrapped = LearnedRewardWrapper(env, RewardNet.from_checkpoint(path)), LearnedRewardWrapper(env, shaped)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(60)]
    returns = []
    for wrapper in (plain, wrapped):
        obs, _ = wrapper.reset(seed=4)
        first, rewards = obs, []
        for a in actions:
            obs, r, terminated, truncated, _ = wrapper.step(a)
            rewards.append(r)
            if terminated or truncated:
                break
        returns.append((_discounted(rewards, shaped.gamma), first, obs, terminated, len(rewards)))
    (plain_return, s0, s_end, terminated, steps), (shaped_return, *_), = returns
    expected = plain_return - float(shaped.potential.predict(s0))
    if not terminated:
        expected += shaped.gamma ** steps * float(shaped.potential.predict(s_end))
    assert terminated == (env_id == "CartPole-v1")
    assert shaped_return == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_box_soft_advantage_is_the_twins_minimum_at_the_action_minus_the_fixed_soft_value(pendulum_ckpt):
    module = BiCQLML.load_from_checkpoint(pendulum_ckpt, map_location="cpu")
    advantage = SoftAdvantage(module, num_samples=8, seed=3)
    rng = np.random.default_rng(4)
    obs = torch.tensor(rng.normal(size=(5, 3)), dtype=torch.float32)
    actions = torch.tensor(rng.uniform(-2, 2, size=(5, 1)), dtype=torch.float32)
    with torch.no_grad():
        q = module.q_net(module.encoder(obs), actions).float().min(0).values  # (5,)
    value = SoftValuePotential(module, num_samples=8, seed=3)(obs)
    torch.testing.assert_close(advantage(obs, actions), q - value)
    same_state = advantage(obs[:1].expand(2, -1), torch.tensor([[-1.5], [1.5]]))
    assert abs(float(same_state[0] - same_state[1])) > 1e-4  # it scores the action, not only the state
    # numpy pairs, one or many, score the same, and the same pair twice the same (no fresh noise)
    s, a, single = advantage.batch(obs[0].numpy(), actions[0].numpy())
    assert single and s.shape == (1, 3) and a.shape == (1, 1)
    torch.testing.assert_close(advantage(s, a), (q - value)[:1])
    torch.testing.assert_close(advantage(*advantage.batch(obs.numpy(), actions.numpy())[:2]), q - value)


def test_discrete_soft_advantage_is_temperature_times_the_boltzmann_log_probability(cartpole_ckpt):
    module, obs, q = _cartpole_states_and_min_q(cartpole_ckpt, seed=5)
    advantage = SoftAdvantage(module)
    t = module.hparams.temperature
    for a in (0, 1):
        log_pi = torch.log_softmax(q / t, dim=1)[:, a]
        torch.testing.assert_close(advantage(obs, torch.full((6,), a)), t * log_pi)


@pytest.mark.parametrize("score, scorer", [
    ("soft_advantage", SoftAdvantage.from_checkpoint),
    ("log_likelihood", PolicyLogLikelihood.from_checkpoint),
    ("relative_log_likelihood", lambda path: PolicyLogLikelihood.from_checkpoint(path, relative=True))])
def test_a_checkpoints_score_ranks_among_ds_pairs_in_its_own_order(pendulum_ckpt, tiny_data, monkeypatch, score,
                                                                   scorer):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tiny_data.root))
    offline = tiny_data.ids("pendulum")[1]
    data = load_transitions(offline)
    ranked = RankedReward.from_checkpoint(pendulum_ckpt, offline, score=score)
    scores = scorer(pendulum_ckpt)(torch.as_tensor(data.observations), torch.as_tensor(data.actions)).numpy()
    r = ranked.predict(data.observations, data.actions)
    assert np.array_equal(np.argsort(r, kind="stable"), np.argsort(scores, kind="stable"))
    assert r.mean() == pytest.approx(0.5)
    assert float(ranked.predict(data.observations[3], data.actions[3])) == pytest.approx(r[3])


def test_a_score_a_checkpoint_does_not_have_is_refused_in_one_line(pendulum_ckpt, tiny_data, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tiny_data.root))
    with pytest.raises(ValueError, match="use one of 'reward', 'soft_advantage', 'log_likelihood', 'relative"):
        RankedReward.from_checkpoint(pendulum_ckpt, tiny_data.ids("pendulum")[1], score="q")


def test_discrete_controller_log_likelihood_is_its_boltzmann_log_probability(cartpole_ckpt):
    module, obs, q = _cartpole_states_and_min_q(cartpole_ckpt, seed=6)
    likelihood = PolicyLogLikelihood(module)
    t = module.policy.temperature
    per_action = torch.stack([likelihood(obs, torch.full((6,), a)) for a in (0, 1)], 1)
    torch.testing.assert_close(per_action, torch.log_softmax(q / t, dim=1))
    torch.testing.assert_close(per_action.exp().sum(1), torch.ones(6))


def _pendulum_pairs(seed: int):
    rng = np.random.default_rng(seed)
    obs = torch.tensor(rng.normal(size=(7, 3)), dtype=torch.float32)
    return obs, torch.tensor(rng.uniform(-1.9, 1.9, size=(7, 1)), dtype=torch.float32)


def test_box_controller_log_likelihood_is_the_acting_prior_tilted_by_q_as_the_controller_acts(pendulum_ckpt):
    module = BiCQLML.load_from_checkpoint(pendulum_ckpt, map_location="cpu")
    policy, likelihood = module.policy, PolicyLogLikelihood(module)
    obs, actions = _pendulum_pairs(7)
    with torch.no_grad():
        enc = module.encoder(obs)
        log_p = policy.prior.log_prob(enc, actions)
        noise = torch.randn((1, policy.num_candidates, 1), generator=torch.Generator().manual_seed(GREEDY_NOISE_SEED))
        draws = policy.prior.candidates(enc, noise)[0][:, 1:]  # (7, K, 1)
        q_draws = module.q_net(enc, draws).float().min(0).values / policy.temperature
        q = module.q_net(enc, actions).float().min(0).values / policy.temperature
    assert not policy.acts_untilted  # whole demonstrations: D_E's prior, tilted by exp(Q/T)
    log_z = torch.logsumexp(q_draws, 1) - np.log(policy.num_candidates)
    torch.testing.assert_close(likelihood(obs, actions), log_p + q - log_z)
    # After an advantage-weighted refit the controller plays the refitted prior untilted: its density alone.
    policy.relabeled.fill_(True)
    assert policy.acts_untilted
    with torch.no_grad():
        torch.testing.assert_close(likelihood(obs, actions), policy.relabeled_prior.log_prob(enc, actions))
        # the controller's own greedy action is likelier than an action far from it, state by state
        greedy = policy.actions(enc, deterministic=True)
        far = torch.where(greedy > 0, -1.9, 1.9)
    assert (likelihood(obs, greedy) > likelihood(obs, far)).all()


def test_box_boltzmann_log_likelihood_is_a_density_over_the_action_box(pendulum_ckpt):
    module = BiCQLML.load_from_checkpoint(pendulum_ckpt, map_location="cpu")
    policy = BoltzmannPolicy(temperature=0.5, num_candidates=4096)
    policy.build(module.policy.spaces, module.q_net, module.encoder, module.proposal, module.hparams.temperature)
    obs, _ = _pendulum_pairs(8)
    grid = torch.linspace(-2.0, 2.0, 2001)  # Pendulum's torque box
    with torch.no_grad():
        enc = module.encoder(obs[:3])
        density = torch.stack([policy.log_prob(enc, a.expand(3, 1)).exp() for a in grid], 1)  # (3, 2001)
    mass = torch.trapezoid(density, grid, dim=1)
    torch.testing.assert_close(mass, torch.ones(3), atol=0.05, rtol=0)


def test_relative_log_likelihood_is_zero_at_the_controllers_greedy_action_and_keeps_each_states_order(pendulum_ckpt):
    module = BiCQLML.load_from_checkpoint(pendulum_ckpt, map_location="cpu")
    plain, relative = PolicyLogLikelihood(module), PolicyLogLikelihood(module, relative=True)
    obs, actions = _pendulum_pairs(9)
    with torch.no_grad():
        greedy = module.policy.actions(module.encoder(obs), deterministic=True)
    torch.testing.assert_close(relative(obs, greedy), torch.zeros(7))
    torch.testing.assert_close(relative(obs, actions), plain(obs, actions) - plain(obs, greedy))
    other = -actions
    assert torch.equal(relative(obs, actions) > relative(obs, other), plain(obs, actions) > plain(obs, other))
