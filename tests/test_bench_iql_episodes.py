"""``bench.iql_episodes``: what an IQL policy's evaluation episodes are paid, per step."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest

from bench.iql_episodes import episodes, mean_paid
from bicql_lightning import IQL, OfflineIRLDataModule
from test_iql import QUIET


def test_each_episode_reports_its_length_and_the_mean_reward_iql_trained_on_paid_its_steps_true_rewards_ranked(tiny):
    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), batch_size=32, batches_per_epoch=3, val_size=16, seed=0)
    model = IQL(spaces=dm.spaces, hidden_sizes=[16], reward_rank=True)
    L.Trainer(max_epochs=1, **QUIET).fit(model, dm)
    obs, act = dm.pairs("offline")
    true = dm.offline_store.fields["reward"]
    ranks = model.rewards({"obs": obs, "action": act, "reward": true})  # the oracle, ranked: D's true rewards' ranks
    assert mean_paid(model, obs.numpy(), act.numpy(), true.numpy()) == pytest.approx(float(ranks.mean()), abs=1e-6)
    assert float(ranks.mean()) == pytest.approx(0.5, abs=0.01)  # D's own ranks spread evenly over [0, 1]
    rows = episodes(model.eval(), "Pendulum-v1", 2)
    assert [row["length"] for row in rows] == [200, 200]  # Pendulum-v1 truncates at 200 steps
    assert all(np.isnan(row["forward_velocity"]) for row in rows)  # no x_velocity in its info
    assert all(0.0 <= row["paid_per_step"] <= 1.0 for row in rows)
