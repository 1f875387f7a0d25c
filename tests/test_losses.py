"""Each loss term against values computed by hand on tiny tensors."""

import math

import pytest
import torch

from bicql_lightning import losses


def test_soft_value_is_temperature_scaled_log_sum_exp():
    q = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    # T = 1: log(e + e^2 + e^3) = 3.40760596; log(3) = 1.09861229
    assert losses.soft_value(q, 1.0).tolist() == pytest.approx([3.40760596, 1.09861229], abs=1e-6)
    # T = 2: 2 * log(e^0.5 + e + e^1.5) = 2 * 2.14503...
    expected = 2.0 * math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))
    assert losses.soft_value(q[:1], 2.0).item() == pytest.approx(expected, abs=1e-6)


def test_soft_value_approaches_max_as_temperature_falls():
    q = torch.tensor([[1.0, 2.0, 3.0]])
    assert losses.soft_value(q, 0.01).item() == pytest.approx(3.0, abs=1e-3)


def test_sampled_soft_value_equals_exact_value_when_samples_cover_the_actions():
    # Uniform proposal over 4 discrete points with density 1/4, sampled once each:
    # T (logsumexp(Q/T - log(1/4)) - log 4) = T logsumexp(Q/T), the exact soft value.
    q = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    log_prop = torch.full_like(q, math.log(0.25))
    assert losses.sampled_soft_value(q, log_prop, 0.7).item() == pytest.approx(
        losses.soft_value(q, 0.7).item(), abs=1e-6)


def test_sampled_soft_value_is_unbiased_in_exp_space_for_a_continuous_action():
    # Q(a) = -a^2 on [-1, 1], T = 1: exp(V) = ∫ exp(-a^2) da = sqrt(pi) * erf(1) = 1.49365.
    torch.manual_seed(0)
    a = torch.rand(1, 200_000) * 2 - 1
    log_prop = torch.full_like(a, math.log(0.5))
    v = losses.sampled_soft_value(-a.pow(2), log_prop, 1.0)
    assert v.exp().item() == pytest.approx(math.sqrt(math.pi) * math.erf(1.0), rel=2e-3)


def test_td_target_stops_bootstrapping_only_at_termination():
    reward = torch.tensor([1.0, 1.0, 1.0])
    next_value = torch.tensor([10.0, 10.0, 10.0])
    terminated = torch.tensor([0.0, 1.0, 0.0])
    # The third transition is a time-limit truncation: it is not terminated, so it bootstraps.
    y = losses.td_target(reward, next_value, terminated, gamma=0.9)
    assert y.tolist() == pytest.approx([10.0, 1.0, 10.0])


def test_soft_advantage_target():
    q = torch.tensor([2.0, 3.0])
    next_value = torch.tensor([1.0, 5.0])
    terminated = torch.tensor([0.0, 1.0])
    # 2 - 0.5 * 1 = 1.5;  3 - 0 = 3
    assert losses.soft_advantage(q, next_value, terminated, 0.5).tolist() == pytest.approx([1.5, 3.0])


def test_level_anchored_target_is_the_advantage_moved_to_the_rewards_mean():
    advantage = torch.tensor([-1.0, 0.0, 2.0])  # mean 1/3
    reward = torch.tensor([5.0, 4.0, 6.0])  # mean 5
    # A - (1/3 - 5): the differences between pairs are A's, the mean is the reward's.
    target = losses.level_anchored_target(advantage, reward)
    assert target.tolist() == pytest.approx([11 / 3, 14 / 3, 20 / 3])
    assert target.mean().item() == pytest.approx(reward.mean().item())
    # A global gap (given) is used instead of this batch's.
    assert losses.level_anchored_target(advantage, reward, torch.tensor(2.0)).tolist() == pytest.approx([-3.0, -2.0, 0.0])


def test_level_pinned_target_moves_the_advantage_so_its_offline_mean_is_the_level():
    advantage = torch.tensor([1.0, 2.0, 3.0, 4.0])  # the last two are D's pairs, mean 3.5
    target = losses.level_pinned_target(advantage, advantage[2:].mean(), 0.5)
    assert target.tolist() == pytest.approx([-2.0, -1.0, 0.0, 1.0])
    assert target[2:].mean().item() == pytest.approx(0.5)


def test_terminal_zero_target_sets_only_the_terminal_pairs_to_zero():
    target = torch.tensor([3.0, -1.0, 7.5, 2.0])
    terminated = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert losses.terminal_zero_target(target, terminated).tolist() == [3.0, 0.0, 0.0, 2.0]


def test_a_uniform_shift_of_the_reward_has_no_gradient_against_the_anchored_target():
    advantage = torch.tensor([-1.0, 0.0, 2.0, 0.5])
    base = torch.tensor([5.0, 4.0, 6.0, 3.0])
    shift = torch.zeros((), requires_grad=True)
    reward = base + shift
    loss, _ = losses.reward_loss(reward, losses.level_anchored_target(advantage, reward.detach()))
    loss.backward()
    assert shift.grad.item() == pytest.approx(0.0, abs=1e-6)
    # Against A itself the same shift is pulled toward A's level.
    shift.grad = None
    reward = base + shift
    losses.reward_loss(reward, advantage)[0].backward()
    assert shift.grad.item() == pytest.approx(2 * ((base - advantage).mean()).item())


def test_q_loss_sums_twins_and_averages_batch():
    q = torch.tensor([[1.0, 2.0], [0.0, 4.0]], requires_grad=True)  # (E=2, B=2)
    target = torch.tensor([1.0, 1.0], requires_grad=True)
    loss, metrics = losses.q_loss(q, target)
    # twin 0: (0 + 1)/2 = 0.5; twin 1: (1 + 9)/2 = 5  -> 5.5
    assert loss.item() == pytest.approx(5.5)
    loss.backward()
    assert target.grad is None  # the target is a constant of the Q update
    assert q.grad.flatten().tolist() == pytest.approx([0.0, 1.0, -1.0, 3.0])
    assert metrics["q/td_loss"].item() == pytest.approx(5.5)


def test_cql_penalty_is_alpha_times_summed_mean_gap():
    value = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    q_data = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, metrics = losses.cql_penalty(value, q_data, alpha=0.5)
    # gaps: twin 0 mean(2, 0) = 1; twin 1 mean(1, 2) = 1.5 -> 0.5 * 2.5
    assert loss.item() == pytest.approx(1.25)
    assert metrics["cql/gap"].item() == pytest.approx(1.25)


def test_cql_penalty_gradient_is_policy_mass_minus_data_action():
    # For one state with Q = [0, log 3] (T = 1): π = [1/4, 3/4]; data action 0.
    # d/dQ [V - Q(a=0)] = π - onehot(0) = [-3/4, 3/4].
    q = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)  # (E=1, B=1, A=2)
    value = losses.soft_value(q, 1.0)
    loss, _ = losses.cql_penalty(value, q[..., 0], alpha=1.0)
    loss.backward()
    assert q.grad[0, 0].tolist() == pytest.approx([-0.75, 0.75])


def test_reward_loss_does_not_flow_into_the_target():
    reward = torch.tensor([1.0, 2.0], requires_grad=True)
    target = torch.tensor([0.0, 4.0], requires_grad=True)
    loss, metrics = losses.reward_loss(reward, target)
    assert loss.item() == pytest.approx((1.0 + 4.0) / 2)
    loss.backward()
    assert target.grad is None
    assert reward.grad.tolist() == pytest.approx([1.0, -2.0])
    assert metrics["reward/mean"].item() == pytest.approx(1.5)
    assert metrics["reward/std"].item() == pytest.approx(0.5)


def test_expert_nll_is_negative_log_boltzmann_probability():
    q = torch.tensor([[0.0, math.log(3.0)]])
    value = losses.soft_value(q, 1.0)
    # P(a=1) = 3/4
    assert losses.expert_nll(value, q[:, 1], 1.0).item() == pytest.approx(-math.log(0.75))
