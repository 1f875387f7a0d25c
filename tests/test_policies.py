"""Acting: the policies read off Q, their fits, and the one ``policy`` argument."""

import math

import numpy as np
import pytest
import torch

from bicql_lightning import BiCQLML, BoltzmannPolicy, GaussianPolicy, TiltedPriorPolicy
from bicql_lightning import OfflineIRLDataModule
from bicql_lightning.policies import GREEDY_NOISE_SEED, advantage_weights, expert_like_episodes, make_policy
from test_module import BOX, DISCRETE, make_batch

SMALL_PRIOR = {"num_candidates": 8, "hidden_sizes": [16]}


def tilted_model(**policy_args):
    torch.manual_seed(0)
    return BiCQLML(spaces=BOX, hidden_sizes=[16], policy=TiltedPriorPolicy.config(**{**SMALL_PRIOR, **policy_args}))


class FakeData:
    """The named data contract (policies.OfflineData) over given tensors."""

    def __init__(self, expert, offline=None, offline_episodes=None, consecutive=0.0):
        self.sets = {"expert": expert, "offline": offline or expert}
        self.consecutive = consecutive  # D_E's pairs stand alone unless told (subsampled demonstrations)
        self.episode_ids = {"expert": torch.zeros(len(expert[0]), dtype=torch.int32),
                            "offline": offline_episodes}
        self.offline_is_expert = offline is None

    def num_transitions(self, which):
        return len(self.sets[which][0])

    def pairs(self, which, index=slice(None)):
        obs, actions = self.sets[which]
        return obs[index], actions[index]

    def episodes(self, which):
        return self.episode_ids[which]

    def consecutive_share(self, which):
        return self.consecutive


@pytest.mark.parametrize("make", [
    lambda: tilted_model(),
    lambda: BiCQLML(spaces=BOX, hidden_sizes=[16], policy=BoltzmannPolicy.config(num_candidates=8)),
    lambda: BiCQLML(spaces=DISCRETE, hidden_sizes=[16]),
], ids=["tilted-box", "boltzmann-box", "discrete"])
def test_greedy_act_is_a_function_of_each_observation_alone(make):
    model = make()
    obs = make_batch(model.spaces, batch_size=5)["obs"].numpy()
    alone = np.stack([model.act(o) for o in obs])
    np.testing.assert_allclose(model.act(obs), alone, atol=1e-5)
    # The same observation three times, and among others, gets the same action.
    np.testing.assert_allclose(model.act(np.stack([obs[0]] * 3)), np.stack([alone[0]] * 3), atol=1e-5)
    np.testing.assert_allclose(model.act(obs[::-1].copy())[::-1], alone, atol=1e-5)


def test_the_default_controller_is_the_tilted_clipped_gaussian_prior_at_temperature_four():
    model = BiCQLML(spaces=BOX, hidden_sizes=[16])
    assert isinstance(model.policy, TiltedPriorPolicy)
    assert (model.policy.temperature, model.policy.num_candidates, model.policy.relabel) == (4.0, 64, "auto")
    assert (model.policy.relabel_weights, model.policy.tilt_after_refit) == ("advantage", False)
    assert model.policy.prior.distribution == "clipped"
    # The benchmark's training settings are the defaults too.
    assert model.hparams.advantage_net == "target" and model.hparams.cql_value_with_data_action


def test_tilted_greedy_action_is_the_best_candidate_by_q_over_t_plus_log_prior():
    model = tilted_model(temperature=0.5)
    obs = torch.randn(6, 5)
    enc = model.encoder(obs)
    noise = torch.randn((1, 8, 2), generator=torch.Generator().manual_seed(GREEDY_NOISE_SEED))
    cands, log_prior = model.policy.prior.candidates(enc, noise)
    score = model.q_net(enc, cands).min(0).values / 0.5 + log_prior
    expected = cands[torch.arange(6), score.argmax(1)]
    np.testing.assert_allclose(model.act(obs.numpy()), expected.detach().numpy(), atol=1e-6)


def test_the_acting_temperature_moves_the_controller_between_the_prior_mode_and_q():
    obs = torch.randn(32, 5)
    cold, hot = tilted_model(temperature=1e-6), tilted_model(temperature=1e9)
    enc = cold.encoder(obs)
    noise = torch.randn((1, 8, 2), generator=torch.Generator().manual_seed(GREEDY_NOISE_SEED))
    cands, _ = cold.policy.prior.candidates(enc, noise)
    best_q = cands[torch.arange(32), cold.q_net(enc, cands).min(0).values.argmax(1)]
    np.testing.assert_allclose(cold.act(obs.numpy()), best_q.detach().numpy(), atol=1e-6)
    # Without Q's pull the prior's density decides: its mode.
    np.testing.assert_allclose(hot.act(obs.numpy()), hot.policy.prior.mode(enc).numpy(), atol=1e-6)


def test_sampled_actions_follow_the_prior_when_q_does_not_pull():
    model = tilted_model(temperature=1e9)
    model.policy.num_candidates = 64
    one = torch.zeros(1, 5)
    obs = one.repeat(4000, 1).numpy()
    actions = model.act(obs, deterministic=False)
    direct = model.policy.prior.sample(model.encoder(one.repeat(4000, 1))).numpy()
    np.testing.assert_allclose(actions.mean(0), direct.mean(0), atol=0.06)
    np.testing.assert_allclose(actions.std(0), direct.std(0), rtol=0.1)


def test_boltzmann_greedy_action_is_the_best_proposal_candidate_by_q():
    torch.manual_seed(0)
    model = BiCQLML(spaces=BOX, hidden_sizes=[16], policy=BoltzmannPolicy.config(num_candidates=8))
    obs = torch.randn(5, 5)
    enc = model.encoder(obs)
    noise = model.proposal.draw_noise(1, 8, torch.Generator().manual_seed(GREEDY_NOISE_SEED))
    draws, _ = model.proposal.sample(enc, 8, noise=noise)
    cands = torch.cat([model.proposal.mode(enc).unsqueeze(1), draws], 1)
    expected = cands[torch.arange(5), model.q_net(enc, cands).min(0).values.argmax(1)]
    np.testing.assert_allclose(model.act(obs.numpy()), expected.detach().numpy(), atol=1e-6)


def test_clipped_gaussian_candidates_are_the_mode_and_the_given_draws_with_u_space_densities():
    torch.manual_seed(0)
    prior = GaussianPolicy(BOX, [16], "clipped")
    obs = torch.randn(3, 5)
    mean, log_std = prior(obs)  # (3, 2) each
    eps = torch.randn((1, 4, 2), generator=torch.Generator().manual_seed(1))
    cands, log_prior = prior.candidates(obs, eps)
    u = torch.cat([mean.unsqueeze(1), mean.unsqueeze(1) + log_std.exp().unsqueeze(1) * eps], 1)
    torch.testing.assert_close(cands, torch.tensor([2.0, 1.0]) * u.clamp(-1, 1))
    torch.testing.assert_close(cands[:, 0], prior.mode(obs))
    z = (u - mean.unsqueeze(1)) / log_std.exp().unsqueeze(1)
    torch.testing.assert_close(log_prior, (-0.5 * z**2 - log_std.unsqueeze(1) - 0.5 * math.log(2 * math.pi)).sum(-1))
    torch.testing.assert_close(log_prior[:, 0], -log_std.sum(-1) - math.log(2 * math.pi))


def saturated_demonstrations(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 5, generator=g)
    mean = torch.stack([1.5 * torch.tanh(obs[:, 0]), 0.8 * torch.tanh(obs[:, 1])], 1)
    high = torch.tensor(BOX["action_high"])
    actions = torch.maximum(torch.minimum(mean + 0.8 * high * torch.randn(mean.shape, generator=g), high), -high)
    return obs, actions, mean


def test_fit_recovers_the_mean_of_saturated_demonstrations_and_freezes_the_prior():
    # Demonstrations like the benchmark's: clip(mean + noise), many of them on a face.
    model = tilted_model(hidden_sizes=[64, 64], fit_steps=1500, lr=1e-3)
    obs, actions, mean = saturated_demonstrations()
    high = torch.tensor(BOX["action_high"])
    assert 0.25 < (actions.abs() == high).float().mean() < 0.6
    assert model.policy.needs_fit
    model.policy.fit(FakeData((obs, actions)), torch.Generator().manual_seed(0))
    prior = model.policy.prior
    assert not model.policy.needs_fit and not any(p.requires_grad for p in prior.parameters())
    greedy = prior.mode(model.encoder(obs[:512]))
    # Within a seventh of the noise's spread (0.8 in unit coordinates) of the true mean.
    assert ((greedy - mean[:512]) / high).abs().mean() < 0.115
    _, log_std = prior(model.encoder(obs[:512]))
    assert torch.allclose(log_std.exp().mean(), torch.tensor(0.8), atol=0.1)


def test_a_cosine_fit_anneals_the_learning_rate_to_zero_and_a_constant_one_keeps_it(monkeypatch):
    used = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    obs, actions, _ = saturated_demonstrations(n=256)
    lrs = {}
    for schedule in ("constant", "cosine"):
        model = tilted_model(fit_steps=100, lr=1e-3, fit_schedule=schedule)
        used.clear()
        model.policy.fit(FakeData((obs, actions)), torch.Generator().manual_seed(0))
        lrs[schedule] = list(used)
    assert lrs["constant"] == [1e-3] * 100
    cosine = lrs["cosine"]
    assert len(cosine) == 100 and cosine[0] == 1e-3
    assert math.isclose(cosine[50], 0.5e-3, rel_tol=1e-6)  # half-way: half the rate
    assert cosine[-1] < 1e-6 and all(a > b for a, b in zip(cosine, cosine[1:]))


def test_a_cosine_fit_still_recovers_the_demonstrations_mean():
    model = tilted_model(hidden_sizes=[64, 64], fit_steps=1500, lr=1e-3, fit_schedule="cosine")
    obs, actions, mean = saturated_demonstrations()
    model.policy.fit(FakeData((obs, actions)), torch.Generator().manual_seed(0))
    greedy = model.policy.prior.mode(model.encoder(obs[:512]))
    assert ((greedy - mean[:512]) / torch.tensor(BOX["action_high"])).abs().mean() < 0.115


def test_refit_clones_the_episodes_the_learned_reward_ranks_as_expert_like():
    model = tilted_model(hidden_sizes=[32], fit_steps=600, lr=3e-3, relabel_weights="episodes")
    # D: episode 0 acts +0.8 on both dimensions, episode 1 acts -0.8; the reward likes positive actions.
    obs = torch.randn(400, 5, generator=torch.Generator().manual_seed(1))
    actions = torch.cat([torch.full((200, 2), 0.8), torch.full((200, 2), -0.8)]) * torch.tensor([2.0, 1.0]) / 2
    episodes = torch.cat([torch.zeros(200), torch.ones(200)]).int()
    data = FakeData((obs[:50], actions[:50]), (obs, actions), episodes)
    model.policy.fit(data, torch.Generator().manual_seed(0))
    metrics = model.policy.refit(data, lambda o, a: a.sum(-1), torch.Generator().manual_seed(0))
    assert metrics == {"policy/relabeled_share": 0.5} and model.policy.revision == 1
    assert model.policy.acting_prior is model.policy.relabeled_prior
    mode = model.policy.acting_prior.mode(model.encoder(obs[200:]))  # also at the other episode's states
    assert (mode - actions[0]).abs().max() < 0.15
    # Where D is D_E there is nothing to relabel: the demonstrations' prior stays.
    fresh = tilted_model()
    assert fresh.policy.refit(FakeData((obs, actions)), lambda o, a: a.sum(-1), torch.Generator()) == {}
    assert fresh.policy.acting_prior is fresh.policy.prior and fresh.policy.revision == 0


def test_by_default_whole_demonstrations_keep_their_own_prior_and_sparse_ones_are_refitted_to_d():
    obs = torch.randn(400, 5, generator=torch.Generator().manual_seed(1))
    actions = 0.3 * torch.ones(400, 2)
    advantage = dict(advantage=lambda o, a: o[:, 0])
    for consecutive, refits in ((0.999, False), (0.5, False), (0.49, True), (0.0, True)):
        model = tilted_model(fit_steps=5)
        data = FakeData((obs[:50], actions[:50]), (obs, actions), torch.arange(400).int(), consecutive=consecutive)
        model.policy.fit(data, torch.Generator().manual_seed(0))
        metrics = model.policy.refit(data, lambda o, a: a.sum(-1), torch.Generator().manual_seed(0), **advantage)
        assert bool(model.policy.relabeled) == refits and model.policy.revision == int(refits)
        assert (model.policy.acting_prior is model.policy.relabeled_prior) == refits
        assert (metrics["policy/relabeled_share"] > 0) == refits
    # relabel: true refits whole demonstrations too, false never refits.
    for relabel, refits in ((True, True), (False, False)):
        model = tilted_model(fit_steps=5, relabel=relabel)
        data = FakeData((obs[:50], actions[:50]), (obs, actions), torch.arange(400).int(), consecutive=1.0)
        model.policy.refit(data, lambda o, a: a.sum(-1), torch.Generator().manual_seed(0), **advantage)
        assert bool(model.policy.relabeled) == refits
    with pytest.raises(ValueError, match="policy relabel must be 'auto', 'heldout', true or false"):
        TiltedPriorPolicy(relabel="sometimes")


class DemonstrationInD(FakeData):
    """D holds D_E's pairs first, then logged ones; whole demonstrations (consecutive 1.0)."""

    def __init__(self, expert, logged):
        n = len(expert[0])
        offline = (torch.cat([expert[0], logged[0]]), torch.cat([expert[1], logged[1]]))
        super().__init__(expert, offline, torch.arange(len(offline[0])).int(), consecutive=1.0)
        self.copies = torch.arange(len(offline[0])) < n

    def expert_in_offline(self):
        return self.copies


@pytest.mark.parametrize("logged_agree", [True, False], ids=["d-acts-like-the-expert", "d-acts-otherwise"])
def test_relabel_heldout_refits_whole_demonstrations_only_where_that_predicts_held_out_expert_actions_better(
        logged_agree):
    # The expert acts 0.6·tanh(2·s_0) on both dimensions; 25 demonstration pairs, 800 logged.
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(825, 5, generator=g)
    expert_action = 0.6 * torch.tanh(2 * obs[:, :1]).expand(-1, 2)
    logged_action = expert_action[25:] if logged_agree else -0.5 * torch.ones(800, 2)
    data = DemonstrationInD((obs[:25], expert_action[:25]), (obs[25:], logged_action))
    advantage = dict(advantage=lambda o, a: torch.zeros(len(o)))  # Q ranks nothing: a plain fit of D
    runs = {}
    for relabel in ("heldout", True, "auto"):
        model = tilted_model(hidden_sizes=[32], fit_steps=300, lr=1e-2, relabel=relabel)
        model.policy.fit(data, torch.Generator().manual_seed(0))
        metrics = model.policy.refit(data, lambda o, a: a.sum(-1), torch.Generator().manual_seed(0), **advantage)
        runs[relabel] = model, metrics
    # The default keeps D_E's prior for whole demonstrations without asking.
    assert runs["auto"][1] == {"policy/relabeled_share": 0.0} and not bool(runs["auto"][0].policy.relabeled)
    model, metrics = runs["heldout"]
    # Five of the 25 pairs are held out; D's 800 pairs of the expert's own rule predict them
    # better than 20 pairs do, and D's other behaviour predicts them worse.
    expert_error, refit_error = metrics["policy/heldout_error_expert"], metrics["policy/heldout_error_refit"]
    assert (refit_error < 0.1 * expert_error) if logged_agree else (refit_error > expert_error)
    assert bool(model.policy.relabeled) == logged_agree
    assert (metrics["policy/relabeled_share"] > 0) == logged_agree
    # Choosing draws from a copy of the stream: where it refits, the refit is relabel: true's, bit for bit.
    forced = runs[True][0].policy
    assert "policy/heldout_error_refit" not in runs[True][1]  # relabel: true does not ask
    same = all(torch.equal(a, b) for a, b in zip(model.policy.relabeled_prior.state_dict().values(),
                                                 forced.relabeled_prior.state_dict().values()))
    assert same == logged_agree


def test_demonstration_pairs_in_d_are_always_kept_and_never_crowd_out_the_best_logged_episode():
    # Episodes 0..2 logged (means 1.0, 2.5, -2.0), episode 3 = D_E's two pairs (mean 5.0).
    reward = torch.tensor([0.0, 2.0, 2.0, 3.0, -2.0, 5.0, 5.0])
    episode = torch.tensor([0, 0, 1, 1, 2, 3, 3], dtype=torch.int32)
    demonstration = torch.tensor([False] * 5 + [True] * 2)
    # D's mean 2.14, expert level 5, f = 0.5 -> threshold 3.57: no logged episode reaches it.
    alone = expert_like_episodes(reward, episode, 5.0, 0.5)
    assert alone.tolist() == [False] * 5 + [True] * 2  # ranked with the rest, D_E's pairs are all that is kept
    kept = expert_like_episodes(reward, episode, 5.0, 0.5, demonstration)
    assert kept.tolist() == [False, False, True, True, False, True, True]  # + the best logged episode


def test_the_data_module_marks_the_demonstration_pairs_it_appended_to_d(tiny):
    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), expert_subsample=20)
    mask = dm.expert_in_offline()
    assert int(mask.sum()) == dm.num_transitions("expert") and mask[-dm.num_transitions("expert"):].all()
    obs_d, act_d = dm.pairs("offline", mask.nonzero().squeeze(1))
    obs_e, act_e = dm.pairs("expert")
    assert torch.equal(obs_d, obs_e) and torch.equal(act_d, act_e)
    alone = OfflineIRLDataModule(*tiny.ids("pendulum"), include_expert_in_offline=False)
    assert not alone.expert_in_offline().any()


def test_expert_like_episodes_keeps_the_episodes_whose_mean_learned_reward_reaches_the_threshold():
    # Episodes 0..3 of lengths 2, 3, 1, 2; per-transition means 1.0, 3.0, -2.0, 2.5.
    reward = torch.tensor([0.0, 2.0, 3.0, 4.0, 2.0, -2.0, 2.0, 3.0])
    episode = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3], dtype=torch.int32)
    # D's mean 1.75; expert level 3.75; f = 0.5 -> threshold 2.75: only episode 1.
    assert expert_like_episodes(reward, episode, 3.75, 0.5).tolist() == [False, False, True, True, True, False,
                                                                         False, False]
    # f = 0 -> 1.75: episodes 1 and 3. f = 1 -> 3.75: none reaches it, the best is kept.
    assert expert_like_episodes(reward, episode, 3.75, 0.0).tolist() == [False, False, True, True, True, False,
                                                                         True, True]
    assert expert_like_episodes(reward, episode, 3.75, 1.0).tolist() == [False, False, True, True, True, False,
                                                                         False, False]


def test_the_policy_argument_names_a_class_and_its_arguments_and_is_checked_at_once():
    assert isinstance(make_policy(None), TiltedPriorPolicy)
    assert isinstance(make_policy({"init_args": {"temperature": 2.0}}), TiltedPriorPolicy)
    boltzmann = make_policy({"class_path": "BoltzmannPolicy", "init_args": {"temperature": 0.5}})
    assert isinstance(boltzmann, BoltzmannPolicy) and boltzmann.temperature == 0.5
    assert isinstance(make_policy(BoltzmannPolicy.config()), BoltzmannPolicy)
    for spec, message in (({"class_path": "Foo"}, "is not a policy"),
                          ({"class_path": "bicql_lightning.BiCQLML"}, "is not a policy"),
                          ({"init_args": {"temprature": 2.0}}, "has no argument 'temprature'"),
                          ({"class": "BoltzmannPolicy"}, "takes 'class_path' and 'init_args'"),
                          ({"init_args": {"temperature": 0.0}}, "temperature must be positive"),
                          ({"init_args": {"fit_schedule": "linear"}}, "fit_schedule must be 'constant' or 'cosine'")):
        with pytest.raises(ValueError, match=message):
            BiCQLML(policy=spec)  # no spaces, no data: refused before anything is read


def test_the_boltzmann_policy_defaults_to_the_training_temperature():
    model = BiCQLML(spaces=DISCRETE, hidden_sizes=[16], temperature=0.3, policy=BoltzmannPolicy.config())
    assert model.policy.temperature == 0.3


def test_advantage_weights_are_the_exponentiated_standardised_advantages_clipped():
    adv = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)
    z = (adv - adv.mean()) / adv.std()
    torch.testing.assert_close(advantage_weights(adv), torch.exp(z.clamp(max=5.0)))
    # Invariant to the advantages' scale and level: one setting serves any task's Q values.
    torch.testing.assert_close(advantage_weights(10 * adv - 7), advantage_weights(adv))
    # A smaller scale sharpens them; the clip bounds the largest at e^5 times exp(0).
    sharp = advantage_weights(adv[:5], scale=0.5)
    assert sharp[4] / sharp[0] == pytest.approx(float(torch.exp((adv[4] - adv[0]) / (0.5 * adv[:5].std()))))
    assert float(advantage_weights(torch.tensor([0.0] * 99 + [1e6])).max()) == pytest.approx(float(np.exp(5.0)))


def test_the_advantage_refit_draws_the_prior_toward_the_actions_q_ranks_higher_but_keeps_the_rest():
    # D: half the transitions act +0.4, half -0.4 on both dimensions, at the same states;
    # the advantage favours the positive ones by one standard deviation.
    model = tilted_model(hidden_sizes=[32], fit_steps=800, lr=3e-3)
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(400, 5, generator=g)
    sign = torch.cat([torch.ones(200), -torch.ones(200)])
    actions = 0.4 * sign[:, None] * torch.tensor([2.0, 1.0]) / 2
    data = FakeData((obs[:50], actions[:50]), (obs, actions), torch.arange(400).int())
    model.policy.fit(data, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs the module's soft advantages"):
        model.policy.refit(data, lambda o, a: a.sum(-1), torch.Generator())
    metrics = model.policy.refit(data, lambda o, a: a.sum(-1), torch.Generator().manual_seed(0),
                                 advantage=lambda o, a: a.sum(-1))
    weights = advantage_weights((actions.sum(-1)))
    assert metrics["policy/relabeled_share"] == pytest.approx(float(weights.sum() ** 2 / weights.pow(2).sum() / 400))
    assert 0.5 < metrics["policy/relabeled_share"] < 1.0  # e^2 times the weight: a tilt, not a cut
    assert model.policy.revision == 1 and model.policy.acting_prior is model.policy.relabeled_prior
    # The weighted fit's mean sits between the two actions (±0.2 in the box's unit
    # coordinates), on the favoured side: with weights e^1 against e^-1 the positive share is
    # e^2 / (1 + e^2) = 0.88, a weighted mean of 0.76 × 0.2 = 0.152 (an unweighted fit: 0).
    mean, _ = model.policy.acting_prior(model.encoder(obs))
    unit = mean.mean(0)
    assert torch.allclose(model.policy.acting_prior.to_unit(actions[:1]).abs(), torch.tensor([[0.2, 0.2]]))
    assert 0.12 < float(unit[0]) < 0.18 and 0.12 < float(unit[1]) < 0.18


def refitted(relabel_weights="advantage", **policy_args):
    """A small model whose prior was refitted to a D where Q pulls: (model, observations)."""
    model = tilted_model(temperature=0.05, fit_steps=50, lr=3e-3, relabel_weights=relabel_weights, **policy_args)
    g = torch.Generator().manual_seed(2)
    obs, actions = torch.randn(64, 5, generator=g), torch.rand(64, 2, generator=g) * 2 - 1
    data = FakeData((obs[:16], actions[:16]), (obs, actions), (torch.arange(64) // 8).int())
    model.policy.fit(data, torch.Generator().manual_seed(0))
    model.policy.refit(data, lambda o, a: a.sum(-1), torch.Generator().manual_seed(0),
                       advantage=lambda o, a: a.sum(-1))
    assert model.policy.acting_prior is model.policy.relabeled_prior
    return model, obs


def tilted_pick(model, obs):
    enc = model.encoder(obs)
    noise = torch.randn((1, 8, 2), generator=torch.Generator().manual_seed(GREEDY_NOISE_SEED))
    cands, log_prior = model.policy.acting_prior.candidates(enc, noise)
    score = model.q_net(enc, cands).min(0).values / model.policy.temperature + log_prior
    return cands[torch.arange(len(obs)), score.argmax(1)].detach().numpy()


def test_after_the_advantage_weighted_refit_the_controller_plays_that_prior_untilted():
    model, obs = refitted()
    enc = model.encoder(obs)
    mode = model.policy.acting_prior.mode(enc).numpy()
    np.testing.assert_allclose(model.act(obs.numpy()), mode, atol=1e-6)
    # At T = 0.05 Q would move most actions off that mode: the untilted rule is a real change.
    moved = np.abs(tilted_pick(model, obs) - mode).max(-1) > 1e-6
    assert moved.mean() > 0.5
    # Sampling draws from the refitted prior itself (same numbers, same draws).
    torch.manual_seed(5)
    sampled = model.act(obs.numpy(), deterministic=False)
    torch.manual_seed(5)
    np.testing.assert_allclose(sampled, model.policy.acting_prior.sample(enc).numpy(), atol=1e-6)


def test_tilt_after_refit_and_the_episodes_refit_keep_q_tilting_the_refitted_prior():
    for model, obs in (refitted(tilt_after_refit=True), refitted(relabel_weights="episodes")):
        assert not model.policy.acts_untilted
        np.testing.assert_allclose(model.act(obs.numpy()), tilted_pick(model, obs), atol=1e-6)


def test_the_refit_weights_are_checked():
    with pytest.raises(ValueError, match="relabel_weights must be 'advantage' or 'episodes'"):
        TiltedPriorPolicy(relabel_weights="top")
    with pytest.raises(ValueError, match="advantage_scale must be a positive number"):
        TiltedPriorPolicy(advantage_scale=0.0)
