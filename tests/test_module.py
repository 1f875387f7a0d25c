"""BiCQLML's objectives: where gradients flow, shapes and finiteness for both action kinds."""

import math

import numpy as np
import pytest
import torch

from bicql_lightning import BiCQLML, RewardNet, losses, polyak_update

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
def test_anchored_reward_level_regresses_onto_the_soft_advantage_up_to_a_constant(spaces):
    torch.manual_seed(0)
    kwargs = dict(spaces=spaces, hidden_sizes=[8], reward_hidden_sizes=[8], num_action_samples=4, reward_bound=0.0,
                  termination="neutral")
    free, anchored = BiCQLML(**kwargs), BiCQLML(**kwargs, reward_level="anchored")
    anchored.load_state_dict(free.state_dict())
    batch = make_batch(spaces, batch_size=16)
    free._rng().manual_seed(3)
    anchored._rng().manual_seed(3)  # the same proposal samples for the soft values
    free_loss, m_free = free.reward_objective(batch)
    anchored_loss, m_anchored = anchored.reward_objective(batch)
    reward = free.reward_net(batch["obs"], batch["action"]).detach()
    target = m_free["reward/target_mean"]
    # The anchored loss is the free one less the squared mean gap (a variance decomposition).
    assert anchored_loss.item() == pytest.approx(free_loss.item() - (target - reward.mean()).pow(2).item(), rel=1e-4)
    assert m_anchored["reward/target_mean"].item() == pytest.approx(reward.mean().item(), abs=1e-5)
    # A uniform shift of the unbounded reward (the output layer's bias, every entry of it
    # for a Discrete table) gets no gradient.
    anchored_loss.backward()
    assert abs(anchored.reward_net.net[-1].bias.grad.sum().item()) < 1e-6


def test_data_reward_level_holds_the_mean_target_over_offline_pairs_at_the_level():
    torch.manual_seed(0)
    kwargs = dict(spaces=DISCRETE, hidden_sizes=[8], reward_hidden_sizes=[8], gamma=0.9, advantage_net="target",
                  reward_bound=5.0, termination="failure")
    free, data = BiCQLML(**kwargs), BiCQLML(**kwargs, reward_level="data", offline_reward_level=0.1)
    data.load_state_dict(free.state_dict())
    expert, offline = make_batch(DISCRETE, batch_size=3, seed=2), make_batch(DISCRETE, batch_size=5)
    pairs = {k: torch.cat([expert[k], offline[k]]) for k in offline}
    next_value = torch.arange(5.0)  # the step's target soft values of the offline part
    _, m_free_pairs = free.reward_objective(pairs, (3, 5), next_value)
    _, m_free_offline = free.reward_objective(offline, None, next_value)
    loss, m_data = data.reward_objective(pairs, (3, 5), next_value)
    # failure's range is [0, 10]: D's mean is held 0.1 x 5 above its floor, the expert's
    # pairs keep their advantage over D's.
    assert data.offline_level() == pytest.approx(0.5)
    shift = 0.5 - m_free_offline["reward/target_mean"].item()
    assert m_data["reward/target_mean"].item() == pytest.approx(m_free_pairs["reward/target_mean"].item() + shift,
                                                                abs=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in data.reward_net.parameters())


def test_data_reward_level_sits_above_the_floor_or_the_centre_by_termination():
    model = BiCQLML(spaces=BOX, reward_bound=5.0, reward_level="data", offline_reward_level=0.2)
    for termination, level in (("failure", 1.0), ("success", -9.0), ("neutral", 1.0)):
        model.set_termination(termination)
        assert model.offline_level() == pytest.approx(level)


def test_zero_terminal_reward_regresses_the_steps_that_end_an_episode_onto_zero():
    torch.manual_seed(0)
    kwargs = dict(spaces=DISCRETE, hidden_sizes=[8], reward_hidden_sizes=[8], gamma=0.9, advantage_net="target",
                  reward_bound=5.0, termination="failure")
    advantage, zero = BiCQLML(**kwargs), BiCQLML(**kwargs, terminal_reward="zero")
    zero.load_state_dict(advantage.state_dict())
    pairs = make_batch(DISCRETE, batch_size=6)
    pairs["terminated"] = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    next_value = torch.arange(6.0)
    with torch.no_grad():
        soft_adv = losses.soft_advantage(advantage._min_q(pairs, advantage.target_q_net), next_value,
                                         pairs["terminated"], 0.9)
        reward = advantage.reward_net(pairs["obs"], pairs["action"])
    assert soft_adv[[0, 2]].abs().min() > 1e-3  # the advantage there is Q(s, a), not 0 already
    _, m_advantage = advantage.reward_objective(pairs, None, next_value)
    loss, m_zero = zero.reward_objective(pairs, None, next_value)
    expected = torch.where(pairs["terminated"].bool(), 0.0, soft_adv)
    assert m_advantage["reward/target_mean"].item() == pytest.approx(soft_adv.mean().item(), abs=1e-5)
    assert m_zero["reward/target_mean"].item() == pytest.approx(expected.mean().item(), abs=1e-5)
    assert loss.item() == pytest.approx(losses.reward_loss(reward, expected)[0].item(), abs=1e-5)
    # Where termination is neutral, ending is no failure: the soft advantage stays the target.
    zero.set_termination("neutral")
    advantage.set_termination("neutral")
    assert (zero.reward_objective(pairs, None, next_value)[1]["reward/target_mean"].item()
            == pytest.approx(advantage.reward_objective(pairs, None, next_value)[1]["reward/target_mean"].item()))


def test_terminal_reward_must_be_advantage_or_zero():
    with pytest.raises(ValueError, match="terminal_reward"):
        BiCQLML(spaces=BOX, terminal_reward="floor")


def test_reward_level_must_be_free_anchored_or_data():
    with pytest.raises(ValueError, match="reward_level"):
        BiCQLML(spaces=BOX, reward_level="fixed")
    with pytest.raises(ValueError, match="reward_on_offline"):
        BiCQLML(spaces=BOX, reward_level="data", reward_on_offline=False)


@pytest.mark.parametrize("spaces", [DISCRETE, BOX], ids=["discrete", "box"])
def test_act_returns_valid_actions_for_single_and_batched_observations(spaces):
    torch.manual_seed(0)
    model = BiCQLML(spaces=spaces, hidden_sizes=[16], policy={"init_args": {"num_candidates": 8, "hidden_sizes": [16]}})
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
    model = BiCQLML(spaces=DISCRETE, hidden_sizes=[16], temperature=0.5, policy={"class_path": "BoltzmannPolicy"})
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


def test_termination_places_the_bounded_reward_range_and_auto_needs_an_expert_that_never_ends():
    from bicql_lightning.module import resolve_termination

    assert resolve_termination(expert_terminations=0, offline_terminations=7) == "failure"
    assert resolve_termination(expert_terminations=1, offline_terminations=7) == "neutral"
    assert resolve_termination(expert_terminations=0, offline_terminations=0) == "neutral"
    batch = make_batch(BOX, batch_size=256)
    for termination, (low, high) in (("failure", (0.0, 4.0)), ("success", (-4.0, 0.0)), ("neutral", (-2.0, 2.0))):
        model = BiCQLML(spaces=BOX, reward_bound=2.0, termination=termination)
        with torch.no_grad():
            for p in model.reward_net.net.parameters():
                p.mul_(100.0)  # saturate the tanh: both ends of the range are reached
            r = model.reward_net(batch["obs"], batch["action"])
        assert low <= r.min() < low + 0.5 and high - 0.5 < r.max() <= high, termination
    with pytest.raises(ValueError, match="reward_bound"):
        BiCQLML(spaces=BOX, reward_bound=0.0, termination="failure")


def test_reward_weights_saved_without_an_offset_load_as_an_offset_of_zero():
    net = RewardNet(BOX, hidden_sizes=[8], reward_bound=2.0, offset=2.0)
    state = {k: v for k, v in net.state_dict().items() if k != "offset"}
    fresh = RewardNet(BOX, hidden_sizes=[8], reward_bound=2.0, offset=2.0)
    fresh.load_state_dict(state)
    assert float(fresh.offset) == 0.0


def test_invalid_hyperparameters_are_refused_with_their_name():
    with pytest.raises(ValueError, match="cql_data"):
        BiCQLML(spaces=DISCRETE, cql_data="everywhere")
    with pytest.raises(ValueError, match="temperature"):
        BiCQLML(spaces=DISCRETE, temperature=0.0)
    with pytest.raises(ValueError, match="termination"):
        BiCQLML(spaces=DISCRETE, termination="sometimes")
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


def test_residual_advantage_is_the_reward_plus_the_online_twins_mean_td_residual():
    torch.manual_seed(0)
    model = BiCQLML(spaces=DISCRETE, hidden_sizes=[8], gamma=0.9, advantage_net="residual")
    with torch.no_grad():  # online and target differ, as they do while Q rises
        for p in model.q_net.parameters():
            p.add_(0.5)
    expert, batch = make_batch(DISCRETE, batch_size=3, seed=2), make_batch(DISCRETE, batch_size=5)
    pairs = {k: torch.cat([expert[k], batch[k]]) for k in batch}
    next_value = torch.arange(5.0)  # stands for the step's target soft values of the offline part
    with torch.no_grad():
        q, value = model.advantage_parts(pairs, (3, 5), next_value)
        reward = model.reward_net(pairs["obs"], pairs["action"])
        twins = model.q_net(model.encoder(pairs["obs"])).gather(
            2, pairs["action"].view(1, -1, 1).expand(2, -1, 1)).squeeze(2)  # (E, B)
        y = losses.td_target(reward, value, pairs["terminated"], 0.9)  # the Q update's TD target
        target = model.reward_target(q, value, pairs)
    assert value[3:].tolist() == next_value.tolist()  # the offline part reuses the step's values
    assert value[:3].tolist() == pytest.approx(model.target_soft_value(expert).tolist(), rel=1e-6)
    assert q.tolist() == pytest.approx(twins.mean(0).tolist(), rel=1e-6)
    # So the target differs from r_θ by the online twins' mean TD residual, nothing else.
    assert (target - reward).tolist() == pytest.approx((twins - y).mean(0).tolist(), rel=1e-5, abs=1e-5)
    loss, _ = model.reward_objective(pairs, (3, 5), next_value)
    assert loss.item() == pytest.approx((reward - target).pow(2).mean().item(), rel=1e-5)


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


@pytest.mark.parametrize("with_data", [True, False], ids=["data-action-in-partition", "samples-only"])
def test_cql_gradient_samples_keep_the_soft_value_and_estimate_its_gradient_without_bias(with_data):
    torch.manual_seed(0)
    kwargs = dict(spaces=BOX, hidden_sizes=[32, 32], num_action_samples=8, temperature=0.5, proposal_seed=3,
                  cql_value_with_data_action=with_data)
    exact = BiCQLML(**kwargs)
    sampled = BiCQLML(**kwargs, cql_gradient_samples=1)
    sampled.load_state_dict(exact.state_dict())
    batch = make_batch(BOX, batch_size=16)

    def value_and_grad(model):
        model.zero_grad(set_to_none=True)
        model._make_generator(7)  # the same proposal samples for both
        q_data, value, q_ood = model._q_and_value(model.q_net, batch)
        value.sum().backward()
        return q_data.detach(), value.detach(), q_ood, torch.cat([p.grad.flatten() for p in model.q_net.parameters()])

    q_exact, v_exact, ood_exact, g_exact = value_and_grad(exact)
    picks = torch.Generator().manual_seed(11)
    sampled._uniform_noise = lambda rows, shape: torch.rand((rows, *shape), generator=picks)
    draws = [value_and_grad(sampled) for _ in range(400)]
    # The value and the Q at the data actions are the exact ones, draw after draw.
    for q, v, ood, _ in draws[:3]:
        torch.testing.assert_close(v, v_exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q, q_exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ood, ood_exact)
    # One draw's gradient differs from V's; their mean converges to it.
    g_mean = torch.stack([d[3] for d in draws]).mean(0)
    one_draw_error = (draws[0][3] - g_exact).norm() / g_exact.norm()
    mean_error = (g_mean - g_exact).norm() / g_exact.norm()
    assert one_draw_error > 0.05
    assert mean_error < 0.1 * one_draw_error  # 1/sqrt(400) = 0.05 expected
    assert torch.nn.functional.cosine_similarity(g_mean, g_exact, dim=0) > 0.995


def test_cql_gradient_samples_is_checked():
    with pytest.raises(ValueError, match="cql_gradient_samples must be at least 1"):
        BiCQLML(spaces=BOX, cql_gradient_samples=0)
