"""``RankedReward``: a learned reward as the share of D's pairs it ranks below a pair."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from bicql_lightning import RankedReward, RewardNet
from bicql_lightning.spaces import space_spec


def saturated_net(env_id: str, bound: float = 5.0) -> RewardNet:
    """A bounded RewardNet whose outputs before the bound lie in the hundreds, below and above 0."""
    env = gym.make(env_id)
    torch.manual_seed(0)
    net = RewardNet(space_spec(env.observation_space, env.action_space), hidden_sizes=[16], reward_bound=bound,
                    offset=bound)
    with torch.no_grad():
        net.net[-1].weight.mul_(300.0)
    return net.eval()


def pendulum_pairs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    theta = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(theta), np.sin(theta), rng.uniform(-8, 8, n)], 1).astype(np.float32)
    return obs, rng.uniform(-2, 2, (n, 1)).astype(np.float32)


def test_ranks_keep_the_order_the_bounded_reward_flattens_on_its_floor():
    net = saturated_net("Pendulum-v1")
    obs, act = pendulum_pairs(2_000, seed=0)
    ranked = RankedReward.fit(net, obs, act)
    bounded = net.predict(obs, act)
    logits = net.logit(torch.as_tensor(obs), torch.as_tensor(act)).detach().numpy()
    at_floor = bounded == 0.0
    assert at_floor.sum() > 100  # the bound's floor rounds these to one value
    r = ranked.predict(obs, act)
    # On D's own pairs the ranks are (i + 1/2)/n: distinct, in the logits' order, mean 1/2.
    assert len(np.unique(r[at_floor])) == at_floor.sum()
    np.testing.assert_allclose(np.sort(r), (np.arange(2_000) + 0.5) / 2_000, atol=1e-12)
    assert np.array_equal(np.argsort(r), np.argsort(logits))
    assert r.mean() == pytest.approx(0.5)


def test_pairs_outside_ds_range_get_0_or_1_and_one_pair_comes_back_as_a_number():
    net = saturated_net("Pendulum-v1")
    obs, act = pendulum_pairs(500, seed=1)
    logits = net.logit(torch.as_tensor(obs), torch.as_tensor(act)).detach().numpy()
    order = np.argsort(logits)
    middle = order[1:-1]
    ranked = RankedReward.fit(net, obs[middle], act[middle])
    lowest, highest = order[0], order[-1]
    assert ranked.predict(obs[lowest], act[lowest]) == 0.0
    assert ranked.predict(obs[highest], act[highest]) == 1.0
    assert np.ndim(ranked.predict(obs[lowest], act[lowest])) == 0


def test_a_discrete_action_reward_is_ranked_by_the_chosen_actions_value():
    net = saturated_net("CartPole-v1")
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(400, 4)).astype(np.float32)
    actions = rng.integers(0, 2, 400)
    ranked = RankedReward.fit(net, obs, actions)
    table = net.net(torch.as_tensor(obs)).detach().numpy()
    chosen = table[np.arange(400), actions]
    assert np.array_equal(np.argsort(ranked.predict(obs, actions)), np.argsort(chosen))


def test_fitting_on_mismatched_or_empty_pairs_is_refused_in_one_line():
    net = saturated_net("Pendulum-v1")
    obs, act = pendulum_pairs(10, seed=2)
    with pytest.raises(ValueError, match="10 observations but 9 actions"):
        RankedReward.fit(net, obs, act[:9])
    with pytest.raises(ValueError, match="at least 2 finite reference logits"):
        RankedReward.fit(net, obs[:0], act[:0])
    with pytest.raises(ValueError, match="1 not finite"):
        RankedReward(net, np.array([0.0, 1.0, np.nan]))



def test_a_large_batch_is_scored_in_chunks_and_ranks_as_pairs_one_at_a_time(monkeypatch):
    import bicql_lightning.ranked as ranked_module

    net = saturated_net("Pendulum-v1")
    obs, act = pendulum_pairs(1_000, seed=3)
    ranked = RankedReward.fit(net, obs, act)
    monkeypatch.setattr(ranked_module, "CHUNK", 64)  # a soft advantage would need GBs for one pass of D
    seen = []
    logit = net.logit
    monkeypatch.setattr(net, "logit", lambda s, a: seen.append(len(s)) or logit(s, a))
    queries, actions = pendulum_pairs(300, seed=4)
    batched = ranked.predict(queries, actions)
    assert max(seen) == 64 and sum(seen) == 300
    np.testing.assert_allclose(batched[::37], [ranked.predict(q, a) for q, a in zip(queries[::37], actions[::37])],
                               rtol=1e-6)
