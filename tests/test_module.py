"""BiCQLML's objectives: where gradients flow, shapes and finiteness for both action kinds."""

import math

import numpy as np
import pytest
import torch

from bicql_lightning import BiCQLML, RewardNet, polyak_update
from bicql_lightning.module import expert_like_episodes

DISCRETE = dict(obs_kind="box", obs_dim=4, action_kind="discrete", action_dim=3, action_low=[], action_high=[])
BOX = dict(obs_kind="box", obs_dim=5, action_kind="box", action_dim=2, action_low=[-2.0, -1.0], action_high=[2.0, 1.0])
TABULAR = dict(obs_kind="discrete", obs_dim=6, action_kind="discrete", action_dim=2, action_low=[], action_high=[])


def make_batch(spaces, batch_size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if spaces["obs_kind"] == "discrete":
        obs = torch.randint(0, spaces["obs_dim"], (batch_size,), generator=g)
        next_obs = torch.randint(0, spaces["obs_dim"], (batch_size,), generator=g)
    else:
        obs = torch.randn(batch_size, spaces["obs_dim"], generator=g)
        next_obs = torch.randn(batch_size, spaces["obs_dim"], generator=g)
    if spaces["action_kind"] == "discrete":
        action = torch.randint(0, spaces["action_dim"], (batch_size,), generator=g)
    else:
        low, high = torch.tensor(spaces["action_low"]), torch.tensor(spaces["action_high"])
        action = low + (high - low) * torch.rand(batch_size, spaces["action_dim"], generator=g)
    return {"obs": obs, "action": action, "reward": torch.randn(batch_size, generator=g),
            "next_obs": next_obs, "terminated": (torch.rand(batch_size, generator=g) < 0.1).float()}


def grads(module):
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("spaces", [DISCRETE, BOX, TABULAR], ids=["discrete", "box", "tabular"])
def test_q_update_gradients_reach_only_the_q_networks(spaces):
    torch.manual_seed(0)
    model = BiCQLML(spaces=spaces, hidden_sizes=[16, 16], reward_hidden_sizes=[16], num_action_samples=4)
    loss, metrics = model.q_objective(make_batch(spaces), make_batch(spaces, seed=1))
    loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in grads(model.q_net))
    assert all(g is None for g in grads(model.reward_net))
    assert all(g is None for g in grads(model.target_q_net))
    if model.proposal is not None:
        assert all(g is None for g in grads(model.proposal))
    assert all(torch.isfinite(v) for v in metrics.values())
    assert metrics["cql/gap"] > 0  # soft value exceeds Q at any single action


@pytest.mark.parametrize("spaces", [DISCRETE, BOX, TABULAR], ids=["discrete", "box", "tabular"])
def test_reward_update_gradients_reach_only_the_reward_network(spaces):
    torch.manual_seed(0)
    model = BiCQLML(spaces=spaces, hidden_sizes=[16, 16], reward_hidden_sizes=[16], num_action_samples=4)
    loss, metrics = model.reward_objective(make_batch(spaces))
    loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in grads(model.reward_net))
    assert all(g is None for g in grads(model.q_net))
    assert all(g is None for g in grads(model.target_q_net))
    assert torch.isfinite(loss)


def test_reward_target_is_the_soft_advantage_of_the_min_twin():
    torch.manual_seed(0)
    model = BiCQLML(spaces=DISCRETE, hidden_sizes=[8], gamma=0.9, temperature=0.5)
    batch = make_batch(DISCRETE, batch_size=5)
    q = model.q_net(model.encoder(batch["obs"])).min(0).values  # (B, A)
    q_next = model.q_net(model.encoder(batch["next_obs"])).min(0).values
    expected = (q.gather(1, batch["action"].view(-1, 1)).squeeze(1)
                - 0.9 * (1 - batch["terminated"]) * 0.5 * torch.logsumexp(q_next / 0.5, dim=1))
    reward = model.reward_net(batch["obs"], batch["action"])
    loss, _ = model.reward_objective(batch)
    assert loss.item() == pytest.approx((reward - expected).pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("spaces", [DISCRETE, BOX], ids=["discrete", "box"])
def test_act_returns_valid_actions_for_single_and_batched_observations(spaces):
    torch.manual_seed(0)
    model = BiCQLML(spaces=spaces, hidden_sizes=[16], num_act_candidates=8)
    obs = make_batch(spaces, batch_size=7)["obs"].numpy()
    batched, single = model.act(obs), model.act(obs[0], deterministic=False)
    if spaces["action_kind"] == "discrete":
        assert batched.shape == (7,) and np.all((batched >= 0) & (batched < spaces["action_dim"]))
        assert np.ndim(single) == 0
    else:
        assert batched.shape == (7, 2) and single.shape == (2,)
        low, high = np.array(spaces["action_low"]), np.array(spaces["action_high"])
        assert np.all(batched >= low) and np.all(batched <= high)


def test_deterministic_discrete_act_is_argmax_of_min_twin():
    torch.manual_seed(0)
    model = BiCQLML(spaces=DISCRETE, hidden_sizes=[16])
    obs = make_batch(DISCRETE, batch_size=50)["obs"]
    q = model.q_net(model.encoder(obs)).min(0).values
    assert np.array_equal(model.act(obs.numpy()), q.argmax(1).numpy())


def test_stochastic_discrete_act_follows_the_boltzmann_policy():
    torch.manual_seed(0)
    model = BiCQLML(spaces=DISCRETE, hidden_sizes=[16], temperature=0.5)
    obs = np.repeat(make_batch(DISCRETE, batch_size=1)["obs"].numpy(), 20000, axis=0)
    q = model.q_net(model.encoder(torch.as_tensor(obs[:1]))).min(0).values[0]
    expected = torch.softmax(q / 0.5, 0).detach().numpy()
    freq = np.bincount(model.act(obs, deterministic=False), minlength=3) / len(obs)
    assert np.abs(freq - expected).max() < 0.015


def test_box_proposal_fit_recovers_a_state_dependent_mean():
    torch.manual_seed(0)
    model = BiCQLML(spaces=BOX, proposal_hidden_sizes=[64, 64], proposal_fit_steps=1500)
    obs = torch.randn(2048, 5)
    actions = torch.stack([torch.tanh(obs[:, 0]) * 1.5, 0.5 * torch.tanh(obs[:, 1])], 1)
    actions = actions + 0.05 * torch.randn_like(actions)
    model.fit_proposal(obs, actions)
    assert bool(model.proposal.fitted)
    assert not any(p.requires_grad for p in model.proposal.parameters())
    mode = model.proposal.mode(model.encoder(obs[:256]))
    assert (mode - actions[:256]).abs().mean() < 0.15


def test_box_proposal_density_integrates_to_one():
    torch.manual_seed(0)
    model = BiCQLML(spaces=BOX, proposal_uniform_weight=0.5)
    obs = model.encoder(torch.randn(1, 5))
    # Monte Carlo over the box (volume 4 * 2 = 8): E_uniform[q] * volume = 1.
    grid = torch.stack([torch.rand(200_000) * 4 - 2, torch.rand(200_000) * 2 - 1], 1).unsqueeze(0)
    density = model.proposal.log_prob(obs, grid).exp()
    assert (density.mean() * 8).item() == pytest.approx(1.0, abs=0.03)


def test_polyak_update_moves_target_by_tau():
    torch.manual_seed(0)
    model = BiCQLML(spaces=DISCRETE, hidden_sizes=[8])
    with torch.no_grad():
        for p in model.q_net.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_q_net.parameters()]
    polyak_update(model.target_q_net, model.q_net, 0.1)
    for b, t, o in zip(before, model.target_q_net.parameters(), model.q_net.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)


def test_bounded_reward_stays_within_its_bound():
    net = RewardNet(BOX, hidden_sizes=[8], reward_bound=2.0)
    with torch.no_grad():
        for p in net.net.parameters():
            p.mul_(100.0)
    batch = make_batch(BOX, batch_size=64)
    r = net(batch["obs"], batch["action"])
    assert r.abs().max() <= 2.0 and r.abs().max() > 1.5


def test_invalid_hyperparameters_are_refused_with_their_name():
    with pytest.raises(ValueError, match="cql_data"):
        BiCQLML(spaces=DISCRETE, cql_data="everywhere")
    with pytest.raises(ValueError, match="temperature"):
        BiCQLML(spaces=DISCRETE, temperature=0.0)
    with pytest.raises(ValueError, match="spaces"):
        BiCQLML(spaces={"obs_dim": 3})


def test_target_advantage_reuses_the_step_soft_values_and_scores_with_the_target_network():
    torch.manual_seed(0)
    model = BiCQLML(spaces=DISCRETE, hidden_sizes=[8], gamma=0.9, advantage_net="target")
    with torch.no_grad():  # make online and target differ, so the test can tell them apart
        for p in model.q_net.parameters():
            p.add_(0.5)
    batch = make_batch(DISCRETE, batch_size=5)
    next_value = torch.arange(5.0)  # stands for the step's target soft values
    q_bar = model.target_q_net(model.encoder(batch["obs"])).min(0).values
    expected = q_bar.gather(1, batch["action"].view(-1, 1)).squeeze(1) - 0.9 * (1 - batch["terminated"]) * next_value
    reward = model.reward_net(batch["obs"], batch["action"])
    loss, _ = model.reward_objective(batch, None, next_value)
    assert loss.item() == pytest.approx((reward - expected).pow(2).mean().item(), rel=1e-5)
    # With the expert part in front, only the offline part's values are reused.
    expert = make_batch(DISCRETE, batch_size=3, seed=2)
    pairs = {k: torch.cat([expert[k], batch[k]]) for k in batch}
    loss_cat, _ = model.reward_objective(pairs, (3, 5), next_value)
    v_expert = model.target_soft_value(expert)
    q_pairs = model.target_q_net(model.encoder(pairs["obs"])).min(0).values.gather(
        1, pairs["action"].view(-1, 1)).squeeze(1)
    expected_cat = q_pairs - 0.9 * (1 - pairs["terminated"]) * torch.cat([v_expert, next_value])
    reward_cat = model.reward_net(pairs["obs"], pairs["action"])
    assert loss_cat.item() == pytest.approx((reward_cat - expected_cat).pow(2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("spaces", [DISCRETE, BOX], ids=["discrete", "box"])
def test_one_shared_batch_is_scored_once_whatever_cql_data_says(spaces):
    torch.manual_seed(0)
    batch = make_batch(spaces)
    reference = BiCQLML(spaces=spaces, hidden_sizes=[16], proposal_seed=3).state_dict()
    values = []
    for cql_data in ("offline", "both"):
        model = BiCQLML(spaces=spaces, hidden_sizes=[16], cql_data=cql_data, proposal_seed=3)
        model.load_state_dict(reference)
        loss, _ = model.q_objective(batch, batch)
        values.append(loss.item())
        assert model.reward_pairs(batch, batch) == (batch, None)
    assert values[0] == pytest.approx(values[1], rel=1e-6)


@pytest.mark.parametrize("spaces", [DISCRETE, BOX], ids=["discrete", "box"])
def test_outputs_stay_float32_and_close_under_bf16_autocast(spaces):
    torch.manual_seed(0)
    model = BiCQLML(spaces=spaces, hidden_sizes=[64, 64], reward_hidden_sizes=[64, 64])
    batch = make_batch(spaces, batch_size=64)
    obs = model.encoder(batch["obs"])
    args = (obs,) if spaces["action_kind"] == "discrete" else (obs, batch["action"])
    q32 = model.q_net(*args)
    r32 = model.reward_net(batch["obs"], batch["action"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q16 = model.q_net(*args)
        r16 = model.reward_net(batch["obs"], batch["action"])
    assert q16.dtype == torch.float32 and r16.dtype == torch.float32
    # bf16 hidden layers, float32 heads: errors of the order of bf16's 2^-8, not worse.
    assert (q16 - q32).abs().max() < 0.02 * q32.abs().max()
    assert (r16 - r32).abs().max() < 0.02 * r32.abs().max()


def test_proposal_weighted_acting_picks_the_best_q_plus_log_proposal_among_gaussian_candidates():
    torch.manual_seed(0)
    model = BiCQLML(spaces=BOX, hidden_sizes=[16], num_act_candidates=8, act_policy="proposal_weighted")
    obs = make_batch(BOX, batch_size=5)["obs"]
    action = model.act(obs.numpy())
    enc = model.encoder(obs)
    gen = torch.Generator().manual_seed(0)
    cands, _ = model.proposal.sample_gaussian(enc, 8, generator=gen)
    cands = torch.cat([model.proposal.mode(enc).unsqueeze(1), cands], 1)
    with torch.no_grad():
        score = model.q_net(enc, cands).min(0).values / model.hparams.temperature + model.proposal.log_prob(enc, cands)
    expected = cands[torch.arange(5), score.argmax(1)]
    np.testing.assert_allclose(action, expected.numpy(), rtol=1e-6)
    # Gaussian candidates only: none from the uniform component far from the Gaussian.
    assert np.all(np.abs(action) <= np.array(BOX["action_high"]))
    sampled = model.act(obs.numpy(), deterministic=False)
    assert sampled.shape == (5, 2) and np.isfinite(sampled).all()


def test_act_temperature_moves_proposal_weighted_acting_between_q_and_the_proposal():
    torch.manual_seed(0)
    obs = make_batch(BOX, batch_size=5)["obs"]
    model = BiCQLML(spaces=BOX, hidden_sizes=[16], num_act_candidates=8, act_policy="proposal_weighted")
    enc = model.encoder(obs)
    gen = torch.Generator().manual_seed(0)
    cands, _ = model.proposal.sample_gaussian(enc, 8, generator=gen)
    cands = torch.cat([model.proposal.mode(enc).unsqueeze(1), cands], 1)
    with torch.no_grad():
        q = model.q_net(enc, cands).min(0).values
        log_q = model.proposal.log_prob(enc, cands)
    rows = torch.arange(5)
    assert not torch.equal(q.argmax(1), log_q.argmax(1))  # the two limits pick differently
    for t_act, score in ((1e-6, q), (1e6, log_q), (0.5, q / 0.5 + log_q)):
        model.hparams.act_temperature = t_act
        np.testing.assert_allclose(model.act(obs.numpy()), cands[rows, score.argmax(1)].numpy(), rtol=1e-6)
    # Nothing in training reads it, and the default is the training temperature.
    assert BiCQLML(spaces=BOX, temperature=0.3).act_temperature == 0.3
    with pytest.raises(ValueError, match="act_temperature must be positive"):
        BiCQLML(spaces=BOX, act_temperature=0.0)


def test_act_candidate_scale_draws_the_candidates_nearer_the_proposal_mode():
    torch.manual_seed(0)
    obs = make_batch(BOX, batch_size=64)["obs"]
    model = BiCQLML(spaces=BOX, hidden_sizes=[16], num_act_candidates=8, act_policy="proposal_weighted",
                    act_candidate_scale=0.25)
    enc = model.encoder(obs)
    gen = torch.Generator().manual_seed(0)
    wide, log_wide = model.proposal.sample_gaussian(enc, 8, generator=gen)
    gen = torch.Generator().manual_seed(0)
    near, log_near = model.proposal.sample_gaussian(enc, 8, generator=gen, std_scale=0.25)
    mode = model.proposal.mode(enc).unsqueeze(1)
    assert (near - mode).abs().mean() < 0.35 * (wide - mode).abs().mean()
    # The returned densities are those of the narrower Gaussian that drew the candidates.
    mu, log_std = model.proposal._gaussian(enc)
    unit = (near - model.proposal.action_center) / model.proposal.action_half
    expected = model.proposal._log_prob_squashed(mu, log_std + math.log(0.25), unit)
    torch.testing.assert_close(log_near, expected)
    cands = torch.cat([mode, near], 1)
    with torch.no_grad():
        score = model.q_net(enc, cands).min(0).values / model.act_temperature + model.proposal.log_prob(enc, cands)
    np.testing.assert_allclose(model.act(obs.numpy()), cands[torch.arange(64), score.argmax(1)].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="act_candidate_scale must be positive"):
        BiCQLML(spaces=BOX, act_candidate_scale=0.0)


def test_clipped_gaussian_act_prior_fit_recovers_the_mean_of_saturated_demonstrations():
    # Demonstrations like the benchmark's: clip(mean + noise), many of them on a face.
    torch.manual_seed(0)
    model = BiCQLML(spaces=BOX, proposal_hidden_sizes=[64, 64], act_policy="proposal_weighted",
                    act_prior="clipped_gaussian", act_prior_fit_steps=1500, act_prior_lr=1e-3)
    obs = torch.randn(4096, 5)
    mean = torch.stack([1.5 * torch.tanh(obs[:, 0]), 0.8 * torch.tanh(obs[:, 1])], 1)
    high = torch.tensor(BOX["action_high"])
    actions = torch.maximum(torch.minimum(mean + 0.8 * high * torch.randn_like(mean), high), -high)
    assert 0.25 < (actions.abs() == high).float().mean() < 0.6
    model.fit_behavior_prior(obs, actions)
    assert bool(model.behavior_prior_fitted) and not any(p.requires_grad for p in model.behavior_prior.parameters())
    greedy = model.behavior_prior.mode(model.encoder(obs[:512]))
    # Within a seventh of the noise's spread (0.8 in unit coordinates) of the true mean.
    assert ((greedy - mean[:512]) / high).abs().mean() < 0.115
    _, log_std = model.behavior_prior(model.encoder(obs[:512]))
    assert torch.allclose(log_std.exp().mean(), torch.tensor(0.8), atol=0.1)  # unit-box noise scale


def test_clipped_gaussian_candidates_are_the_mode_and_draws_with_u_space_densities():
    from bicql_lightning.bc import GaussianPolicy

    torch.manual_seed(0)
    prior = GaussianPolicy(BOX, [16], "clipped")
    obs = torch.randn(3, 5)
    mean, log_std = prior(obs)  # (3, 2) each
    cands, log_prior, log_draw = prior.candidates(obs, 4, std_scale=0.5, generator=torch.Generator().manual_seed(1))
    eps = torch.randn((3, 4, 2), generator=torch.Generator().manual_seed(1))
    u = torch.cat([mean.unsqueeze(1), mean.unsqueeze(1) + 0.5 * log_std.exp().unsqueeze(1) * eps], 1)
    half = torch.tensor([2.0, 1.0])
    torch.testing.assert_close(cands, half * u.clamp(-1, 1))
    torch.testing.assert_close(cands[:, 0], prior.mode(obs))
    # log N(u; mu, sigma) summed over dimensions; at the mode it is -sum(log sigma) - A log sqrt(2 pi).
    z = (u - mean.unsqueeze(1)) / log_std.exp().unsqueeze(1)
    torch.testing.assert_close(log_prior, (-0.5 * z**2 - log_std.unsqueeze(1) - 0.5 * math.log(2 * math.pi)).sum(-1))
    torch.testing.assert_close(log_prior[:, 0], -log_std.sum(-1) - math.log(2 * math.pi))
    torch.testing.assert_close(log_draw, log_prior - z.pow(2).sum(-1) * (1 / 0.25 - 1) / 2 + 2 * math.log(2))


def test_acting_with_the_clipped_gaussian_prior_takes_the_best_candidate_by_q_over_t_plus_log_prior():
    torch.manual_seed(0)
    obs = make_batch(BOX, batch_size=6)["obs"]
    model = BiCQLML(spaces=BOX, hidden_sizes=[16], num_act_candidates=8, act_policy="proposal_weighted",
                    act_prior="clipped_gaussian")
    enc = model.encoder(obs)
    cands, log_prior, _ = model.behavior_prior.candidates(enc, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q = model.q_net(enc, cands).min(0).values
    rows = torch.arange(6)
    picks = {}
    for t_act in (1e6, 0.05, 1e-6):
        model.hparams.act_temperature = t_act
        picks[t_act] = (q / t_act + log_prior).argmax(1)
        np.testing.assert_allclose(model.act(obs.numpy()), cands[rows, picks[t_act]].numpy(), rtol=1e-6)
    assert torch.all(picks[1e6] == 0)  # the prior alone: its mode
    assert torch.equal(picks[1e-6], q.argmax(1))  # Q alone
    assert not torch.equal(picks[0.05], picks[1e6]) and not torch.equal(picks[0.05], picks[1e-6])
    sampled = model.act(obs.numpy(), deterministic=False)
    assert np.all(np.abs(sampled) <= np.array(BOX["action_high"]))


def test_clipped_gaussian_prior_greedy_scores_use_the_prior_density_and_sampling_follows_the_prior():
    torch.manual_seed(0)
    obs = make_batch(BOX, batch_size=6)["obs"]
    model = BiCQLML(spaces=BOX, hidden_sizes=[16], num_act_candidates=8, act_policy="proposal_weighted",
                    act_prior="clipped_gaussian", act_candidate_scale=0.5, act_temperature=0.05)
    enc = model.encoder(obs)
    cands, log_prior, log_draw = model.behavior_prior.candidates(enc, 8, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q = model.q_net(enc, cands).min(0).values
    # Greedy: the prior's density scores, not the narrower density that drew the candidates.
    pick = (q / 0.05 + log_prior).argmax(1)
    assert not torch.equal(pick, (q / 0.05 + log_draw).argmax(1))
    np.testing.assert_allclose(model.act(obs.numpy()), cands[torch.arange(6), pick].numpy(), rtol=1e-6)
    # Sampling at scale 1 with Q switched off (T huge) reproduces the prior: the importance
    # weights prior/draw cancel, so the clipped draws have the prior's mean and spread.
    model.hparams.act_candidate_scale, model.hparams.act_temperature = 1.0, 1e9
    one = np.repeat(obs[:1].numpy(), 4000, axis=0)
    torch.manual_seed(1)
    sampled = model.act(one, deterministic=False)  # (4000, 2)
    torch.manual_seed(2)
    direct = model.behavior_prior.sample(model.encoder(torch.as_tensor(one))).numpy()
    np.testing.assert_allclose(sampled.mean(0), direct.mean(0), atol=0.06)
    np.testing.assert_allclose(sampled.std(0), direct.std(0), rtol=0.08)


def test_act_prior_is_checked_against_the_acting_policy():
    with pytest.raises(ValueError, match="act_prior must be 'proposal' or 'clipped_gaussian'"):
        BiCQLML(spaces=BOX, act_policy="proposal_weighted", act_prior="tanh")
    with pytest.raises(ValueError, match="leave act_prior at 'proposal'"):
        BiCQLML(spaces=BOX, act_prior="clipped_gaussian")
    assert BiCQLML(spaces=BOX).behavior_prior is None  # the default builds nothing extra
    with pytest.raises(ValueError, match="act_prior_data must be 'expert', 'offline', 'both', 'expert_like' or null"):
        BiCQLML(spaces=BOX, act_policy="proposal_weighted", act_prior="clipped_gaussian", act_prior_data="all")
    with pytest.raises(ValueError, match="with act_prior='proposal' leave it null"):
        BiCQLML(spaces=BOX, act_policy="proposal_weighted", act_prior_data="both")
    one = BiCQLML(spaces=BOX, act_policy="proposal_weighted", act_prior="clipped_gaussian", act_prior_data="offline")
    assert one.offline_prior is None  # one prior, fitted to D


def test_expert_like_episodes_keeps_the_episodes_whose_mean_learned_reward_reaches_the_threshold():
    # Episodes 0..3 of lengths 2, 3, 1, 2; per-transition means 1.0, 3.0, -2.0, 2.5.
    reward = torch.tensor([0.0, 2.0, 3.0, 4.0, 2.0, -2.0, 2.0, 3.0])
    episode = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3], dtype=torch.int32)
    # D's mean 1.75; expert level 3.75; f = 0.5 -> threshold 2.75: only episode 1.
    keep = expert_like_episodes(reward, episode, 3.75, 0.5)
    assert keep.tolist() == [False, False, True, True, True, False, False, False]
    # f = 0 -> 1.75: episodes 1 and 3. f = 1 -> 3.75: none reaches it, the best is kept.
    assert expert_like_episodes(reward, episode, 3.75, 0.0).tolist() == [False, False, True, True, True, False,
                                                                         True, True]
    assert expert_like_episodes(reward, episode, 3.75, 1.0).tolist() == [False, False, True, True, True, False,
                                                                         False, False]


def test_expert_like_fraction_is_checked():
    with pytest.raises(ValueError, match="expert_like_fraction must be a finite number"):
        BiCQLML(spaces=BOX, act_policy="proposal_weighted", act_prior="clipped_gaussian", act_prior_data="expert_like",
                expert_like_fraction=float("nan"))


def test_act_prior_data_expert_like_acts_with_d_s_prior_alone_once_it_is_fitted():
    torch.manual_seed(0)
    obs = make_batch(BOX, batch_size=64)["obs"]
    model = BiCQLML(spaces=BOX, hidden_sizes=[16], num_act_candidates=8, act_policy="proposal_weighted",
                    act_prior="clipped_gaussian", act_prior_data="expert_like", act_temperature=0.05)
    before = model.act(obs.numpy())
    model.offline_prior_used.fill_(True)
    after = model.act(obs.numpy())
    # The same rule as D_E's prior alone, with D's prior in its place.
    model.behavior_prior, model.offline_prior = model.offline_prior, model.behavior_prior
    model.offline_prior_used.fill_(False)
    np.testing.assert_array_equal(after, model.act(obs.numpy()))
    assert not np.allclose(before, after)


def test_act_prior_data_both_plays_whichever_tilted_prior_wins_by_q():
    torch.manual_seed(0)
    obs = make_batch(BOX, batch_size=64)["obs"]
    model = BiCQLML(spaces=BOX, hidden_sizes=[16], num_act_candidates=8, act_policy="proposal_weighted",
                    act_prior="clipped_gaussian", act_prior_data="both", act_temperature=0.05)
    alone = model.act(obs.numpy())  # the second prior is not used until it is fitted to D
    enc = model.encoder(obs)
    gen = torch.Generator().manual_seed(0)  # act() draws both priors' candidates from one stream
    rows = torch.arange(64)
    best = []
    for prior in (model.behavior_prior, model.offline_prior):
        cands, log_prior, _ = prior.candidates(enc, 8, generator=gen)
        with torch.no_grad():
            q = model.q_net(enc, cands).min(0).values  # (B, 1+M)
        pick = (q / 0.05 + log_prior).argmax(1)
        best.append((cands[rows, pick], q[rows, pick]))
    np.testing.assert_allclose(alone, best[0][0].numpy(), rtol=1e-6)
    model.offline_prior_used.fill_(True)
    offline_wins = best[1][1] > best[0][1]
    assert 0 < int(offline_wins.sum()) < 64  # the two priors each win somewhere
    expected = torch.where(offline_wins.unsqueeze(1), best[1][0], best[0][0])
    np.testing.assert_allclose(model.act(obs.numpy()), expected.numpy(), rtol=1e-6)


def test_cql_value_with_data_action_puts_the_data_action_inside_the_partition_estimate():
    torch.manual_seed(0)
    model = BiCQLML(spaces=BOX, hidden_sizes=[16], num_action_samples=4, cql_value_with_data_action=True,
                    temperature=0.5, proposal_seed=1)
    batch = make_batch(BOX, batch_size=6)
    q_data, value, _ = model._q_and_value(model.q_net, batch)  # (E, B) each
    obs = model.encoder(batch["obs"])
    log_data = model.proposal.log_prob(obs, batch["action"].unsqueeze(1)).squeeze(1)  # (B,)
    # The data action's own term alone bounds the estimate from below:
    # V >= T (Q(s,a)/T - log q(a|s) - log(M + 1)), so V - Q(s,a) >= -T (log q(a|s) + log(M + 1)).
    bound = -0.5 * (log_data + math.log(5))
    assert torch.all(value - q_data >= bound - 1e-5)
    # and with the samples' terms added it is strictly above that bound.
    assert torch.all(value - q_data > bound + 1e-6)
