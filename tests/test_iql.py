"""IQL: its loss terms against hand-computed values, training on D, and the learned-reward option."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from bicql_lightning import IQL, BiCQLML, CheckpointError, OfflineIRLDataModule
from bicql_lightning.iql import awr_weights, expectile_loss, iql_td_target
from test_module import BOX, DISCRETE, make_batch

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, logger=False,
             enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0)


def test_expectile_loss_weights_positive_errors_by_tau_and_negative_ones_by_one_minus_tau():
    diff = torch.tensor([2.0, -1.0, 0.5, -3.0])
    # 0.7 * 4 + 0.3 * 1 + 0.7 * 0.25 + 0.3 * 9, over 4.
    assert expectile_loss(diff, 0.7).item() == pytest.approx((2.8 + 0.3 + 0.175 + 2.7) / 4)
    assert expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * diff.pow(2).mean().item())
    # Its minimiser over a constant is the tau-expectile: above the mean for tau > 1/2.
    x = torch.tensor([0.0, 0.0, 0.0, 4.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.1)
    for _ in range(2000):
        opt.zero_grad()
        expectile_loss(x - v, 0.9).backward()
        opt.step()
    # 0.9 * (4 - v) = 3 * 0.1 * v  ->  v = 3.6 / 1.2 = 3.0
    assert v.item() == pytest.approx(3.0, abs=1e-3)


def test_awr_weights_are_the_capped_exponential_and_never_overflow():
    adv = torch.tensor([0.0, 0.5, -1.0, 1e6])
    np.testing.assert_allclose(awr_weights(adv, 3.0, 100.0).numpy(), [1.0, np.exp(1.5), np.exp(-3.0), 100.0], rtol=1e-6)
    assert iql_td_target(torch.tensor([1.0, 1.0]), torch.tensor([10.0, 10.0]), torch.tensor([0.0, 1.0]),
                         0.9).tolist() == pytest.approx([10.0, 1.0])


@pytest.mark.parametrize("spaces", [DISCRETE, BOX], ids=["discrete", "box"])
def test_each_objective_moves_only_its_own_network(spaces):
    torch.manual_seed(0)
    model = IQL(spaces=spaces, hidden_sizes=[16])
    batch = make_batch(spaces)
    enc, next_enc = model.encoder(batch["obs"]), model.encoder(batch["next_obs"])
    for objective, args, owner in ((model.value_objective, (enc, batch["action"]), model.value_net),
                                   (model.q_objective, (enc, batch["action"], batch["reward"], next_enc,
                                                        batch["terminated"]), model.q_net),
                                   (model.policy_objective, (enc, batch["action"]), model.policy)):
        model.zero_grad()
        loss, _ = objective(*args)
        loss.backward()
        for net in (model.value_net, model.q_net, model.policy, model.target_q_net):
            touched = any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
            assert touched == (net is owner), (objective.__name__, type(net).__name__)


def fit_iql(tiny, env, **kwargs):
    L.seed_everything(0, verbose=False)
    dm = OfflineIRLDataModule(*tiny.ids(env), batch_size=64, batches_per_epoch=300, val_size=32, seed=0)
    model = IQL(hidden_sizes=[32, 32], lr=1e-3, **kwargs)
    L.Trainer(max_epochs=1, **QUIET).fit(model, dm)
    return model, dm


def test_iql_on_the_true_reward_learns_values_that_rank_expert_actions_above_random_ones(tiny):
    model, dm = fit_iql(tiny, "cartpole")
    obs, actions = dm.pairs("offline")
    with torch.no_grad():
        enc = model.encoder(obs)
        value = model._value(enc)
    assert model.updates == 300 and torch.isfinite(value).all()
    # CartPole pays 1 per step: values are positive and below 1 / (1 - gamma) = 100.
    assert 0.0 < float(value.mean()) < 100.0
    expert_obs, expert_actions = dm.pairs("expert")
    agree = (torch.as_tensor(model.act(expert_obs.numpy())) == expert_actions).float().mean()
    assert agree > 0.8  # the advantage-weighted policy follows the logged good actions


def test_a_learned_reward_checkpoint_relabels_the_batches_and_a_foreign_one_is_refused(tiny, tmp_path):
    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), batch_size=32, batches_per_epoch=5, val_size=16, seed=0)
    bicql = BiCQLML(spaces=dm.spaces, hidden_sizes=[16], reward_hidden_sizes=[16],
                    policy={"init_args": {"hidden_sizes": [16], "fit_steps": 5, "num_candidates": 4}},
                    proposal_fit_steps=5)
    trainer = L.Trainer(max_epochs=1, **QUIET)
    trainer.fit(bicql, dm)
    path = tmp_path / "bicql.ckpt"
    trainer.save_checkpoint(path)
    model = IQL(reward=str(path), hidden_sizes=[16], spaces=dm.spaces)
    batch = dm.sample_batch()["offline"]
    np.testing.assert_allclose(model.rewards(batch).numpy(),
                               bicql.learned_rewards(batch["obs"], batch["action"]).numpy(), rtol=1e-6)
    assert not torch.equal(model.rewards(batch), batch["reward"])
    assert np.allclose(IQL(spaces=dm.spaces, hidden_sizes=[16]).rewards(batch).numpy(), batch["reward"].numpy())
    with pytest.raises(CheckpointError, match="does not exist"):
        IQL(reward=str(tmp_path / "gone.ckpt"))
    other = OfflineIRLDataModule(*tiny.ids("cartpole"), batch_size=32, batches_per_epoch=5, val_size=16, seed=0)
    with pytest.raises(ValueError, match="not on this data's"):
        IQL(reward=str(path), spaces=other.spaces)


def test_reward_scale_returns_is_1000_over_the_spread_of_ds_episode_returns_and_the_checkpoint_keeps_it(tiny, tmp_path):
    from bicql_lightning.datasets import load_transitions

    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), batch_size=32, batches_per_epoch=3, val_size=16, seed=0)
    model = IQL(hidden_sizes=[16], reward_scale="returns")
    trainer = L.Trainer(max_epochs=1, **{**QUIET, "enable_checkpointing": True}, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    # D = the mixed episodes plus the expert's (include_expert_in_offline): every episode's true return.
    returns = np.concatenate([np.bincount(t.episode_ids.astype(np.int64), weights=t.rewards.astype(np.float64))
                              for t in map(load_transitions, tiny.ids("pendulum"))])
    assert float(model.returns_scale) == pytest.approx(1000.0 / (returns.max() - returns.min()), rel=1e-6)
    batch = dm.sample_batch()["offline"]
    np.testing.assert_allclose(model.rewards(batch).numpy(), float(model.returns_scale) * batch["reward"].numpy(),
                               rtol=1e-6)
    path = tmp_path / "iql.ckpt"
    trainer.save_checkpoint(path)
    assert float(IQL.load_from_checkpoint(path).returns_scale) == float(model.returns_scale)
    with pytest.raises(ValueError, match="positive number or 'returns'"):
        IQL(reward_scale="episodes")


def test_reward_centre_subtracts_ds_mean_reward_before_the_returns_scale_and_the_checkpoint_keeps_it(tiny, tmp_path):
    from bicql_lightning.datasets import load_transitions

    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), batch_size=32, batches_per_epoch=3, val_size=16, seed=0)
    model = IQL(spaces=dm.spaces, hidden_sizes=[16], reward_centre=True, reward_scale="returns")
    assert torch.isnan(model.reward_mean)  # not derived before a fit
    trainer = L.Trainer(max_epochs=1, **{**QUIET, "enable_checkpointing": True}, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    data = list(map(load_transitions, tiny.ids("pendulum")))  # D: the mixed episodes and the expert's
    rewards = np.concatenate([t.rewards.astype(np.float64) for t in data])
    assert float(model.reward_mean) == pytest.approx(rewards.mean(), rel=1e-6)
    returns = np.concatenate([np.bincount(t.episode_ids.astype(np.int64),
                                          weights=t.rewards.astype(np.float64) - rewards.mean()) for t in data])
    assert float(model.returns_scale) == pytest.approx(1000.0 / (returns.max() - returns.min()), rel=1e-6)
    batch = dm.sample_batch()["offline"]
    np.testing.assert_allclose(model.rewards(batch).numpy(),
                               float(model.returns_scale) * (batch["reward"].numpy() - rewards.mean()), rtol=1e-5)
    path = tmp_path / "iql.ckpt"
    trainer.save_checkpoint(path)
    assert float(IQL.load_from_checkpoint(path).reward_mean) == float(model.reward_mean)


def test_reward_rank_pays_the_rank_among_ds_pairs_that_ranked_reward_pays_and_the_checkpoint_keeps_it(tiny, tmp_path):
    from bicql_lightning import RankedReward, RewardNet

    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), batch_size=32, batches_per_epoch=3, val_size=16, seed=0)
    bicql = BiCQLML(spaces=dm.spaces, hidden_sizes=[16], reward_hidden_sizes=[16],
                    policy={"init_args": {"hidden_sizes": [16], "fit_steps": 5, "num_candidates": 4}},
                    proposal_fit_steps=5)
    L.Trainer(max_epochs=1, **QUIET).fit(bicql, dm)
    reward_path = tmp_path / "bicql.ckpt"
    bicql.trainer.save_checkpoint(reward_path)
    model = IQL(reward=str(reward_path), spaces=dm.spaces, hidden_sizes=[16], reward_rank=True)
    with pytest.raises(ValueError, match="fit it"):
        model.rewards(dm.sample_batch()["offline"])
    trainer = L.Trainer(max_epochs=1, **{**QUIET, "enable_checkpointing": True}, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    obs, act = dm.pairs("offline")  # D: the mixed episodes and the expert's, as the batches hold them
    assert model.rank_reference.numel() == len(obs)
    ranked = RankedReward.fit(RewardNet.from_checkpoint(reward_path), obs.numpy(), act.numpy())
    batch = dm.sample_batch()["offline"]
    paid = model.rewards(batch).numpy()
    np.testing.assert_allclose(paid, ranked.predict(batch["obs"].numpy(), batch["action"].numpy()), atol=1e-4)
    assert 0.0 <= paid.min() and paid.max() <= 1.0 and paid.std() > 0.1  # spread over [0, 1], not one value
    path = tmp_path / "iql.ckpt"
    trainer.save_checkpoint(path)
    np.testing.assert_array_equal(IQL.load_from_checkpoint(path).rewards(batch).numpy(), paid)


def test_reward_rank_on_the_datasets_reward_pays_each_true_reward_its_rank_among_ds_rewards(tiny):
    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), batch_size=32, batches_per_epoch=3, val_size=16, seed=0)
    model = IQL(spaces=dm.spaces, hidden_sizes=[16], reward_rank=True)  # the oracle, ranked
    L.Trainer(max_epochs=1, **QUIET).fit(model, dm)
    rewards = np.sort(dm.offline_store.fields["reward"].numpy().astype(np.float64))
    batch = dm.sample_batch()["offline"]
    by_hand = np.interp(batch["reward"].numpy(), rewards, (np.arange(len(rewards)) + 0.5) / len(rewards))
    np.testing.assert_allclose(model.rewards(batch).numpy(), by_hand, atol=1e-5)


def test_reward_rank_comes_before_centring_so_ds_ranks_are_centred_on_their_mean_one_half(tiny):
    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), batch_size=32, batches_per_epoch=3, val_size=16, seed=0)
    model = IQL(spaces=dm.spaces, hidden_sizes=[16], reward_rank=True, reward_centre=True)
    L.Trainer(max_epochs=1, **QUIET).fit(model, dm)
    assert float(model.reward_mean) == pytest.approx(0.5, abs=1e-3)  # D's ranks: (i + 1/2)/n, i = 0..n-1
