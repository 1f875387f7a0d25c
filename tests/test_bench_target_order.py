"""bench.target_order: the reward's per-step order beside that of the target it is regressed onto."""

import numpy as np
import pytest
import torch

from bench.target_order import orders, reward_and_target
from bicql_lightning import load_transitions, losses
from test_training import tiny_fit


def test_the_target_is_the_soft_advantage_of_the_target_network_that_training_regresses_on(tiny, tmp_path):
    model, _, _ = tiny_fit(tiny.ids("pendulum"), tmp_path)
    model.eval()
    t = load_transitions(tiny.pendulum_mixed)
    reward, target = reward_and_target(model, t, torch.Generator().manual_seed(3))
    obs, act = torch.as_tensor(t.observations), torch.as_tensor(t.actions)
    with torch.no_grad():
        q = model.target_q_net(model.encoder(obs), act).min(0).values.double()
        samples, log_prop = model.proposal.sample(model.encoder(torch.as_tensor(t.next_observations)),
                                                   model.hparams.num_action_samples,
                                                   generator=torch.Generator().manual_seed(3))
        q_next = model.target_q_net(model.encoder(torch.as_tensor(t.next_observations)), samples).min(0).values
        value = losses.sampled_soft_value(q_next, log_prop, model.hparams.temperature).double()
        by_hand = q - model.hparams.gamma * (1 - torch.as_tensor(t.terminations).double()) * value
        assert reward == pytest.approx(model.reward_net(obs, act).double().numpy(), abs=1e-6)
    assert len(t.rewards) <= 8192  # one chunk: the proposal draws match the hand computation's
    assert target == pytest.approx(by_hand.numpy(), abs=1e-5)


def test_per_step_means_are_ranked_against_the_true_ones_and_terminal_pairs_reported_apart():
    episodes = np.array([0, 0, 1, 1, 1, 2])
    true = np.array([1.0, 1.0, 2.0, 2.0, 2.0, 3.0])  # per-step means 1, 2, 3
    reward = np.array([3.0, 3.0, 2.0, 2.0, 2.0, 1.0])  # backwards
    target = np.array([0.0, 2.0, 1.5, 2.5, 2.0, 5.0])  # per-step means 1, 2, 5: in order
    terminated = np.array([False, True, False, False, False, True])
    out = orders(reward, target, true, episodes, terminated)
    assert out["reward_per_step_spearman"] == pytest.approx(-1.0)
    assert out["target_per_step_spearman"] == pytest.approx(1.0)
    assert out["terminal_pairs"] == 2
    assert out["reward_mean_terminal"] == pytest.approx(2.0) and out["target_mean_terminal"] == pytest.approx(3.5)
