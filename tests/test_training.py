"""Training end to end: Trainer.fit, checkpoints, the reward wrapper, rollout evaluation and the CLI.

Everything runs on the tiny datasets of conftest.py with [32, 32] networks, 20 updates.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import lightning as L
import minari
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from conftest import bicql
from bicql_lightning import (
    BiCQLML,
    CheckpointError,
    LearnedRewardWrapper,
    OfflineIRLDataModule,
    RewardNet,
    RolloutEvaluation,
    TargetNetworkUpdate,
    evaluate_policy,
    space_spec,
)

REPO = Path(__file__).resolve().parents[1]
UPDATES = 20
TINY_MODEL = dict(hidden_sizes=[32, 32], reward_hidden_sizes=[32, 32], proposal_hidden_sizes=[32, 32],
                  proposal_fit_steps=20, num_action_samples=4, updates_per_sec_every=5,
                  policy={"init_args": {"num_candidates": 8, "hidden_sizes": [32, 32], "fit_steps": 300, "lr": 1e-3}})
LOGGED = ("q/td_loss", "cql/gap", "cql/q_data", "cql/q_ood", "reward/loss", "reward/mean", "reward/std",
          "train/updates_per_sec")
QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks gain nothing from threads, and on a busy 2-core machine OpenMP's
    spinning threads make each update ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_fit(ids, root, *, callbacks=(), logger=False, max_epochs=1, batches=UPDATES, seed=0, ckpt_path=None,
             model_kwargs=None, data_kwargs=None):
    """Seeded BiCQLML fit on tiny data: ``batches`` updates per epoch, no checkpointing."""
    L.seed_everything(seed, verbose=False)
    dm = OfflineIRLDataModule(*ids, batch_size=32, batches_per_epoch=batches, val_size=64, seed=seed,
                              **(data_kwargs or {}))
    model = BiCQLML(**{**TINY_MODEL, **(model_kwargs or {})})
    trainer = L.Trainer(max_epochs=max_epochs, logger=logger, log_every_n_steps=10, enable_checkpointing=False,
                        default_root_dir=root, callbacks=list(callbacks), **QUIET)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model, dm, trainer


class QNetRecorder(Callback):
    """The target network at the start of training and q_net after every update."""

    def on_train_start(self, trainer, pl_module):
        self.target_start = [p.detach().clone() for p in pl_module.target_q_net.parameters()]
        self.q_after_update = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.q_after_update.append([p.detach().clone() for p in pl_module.q_net.parameters()])


@pytest.fixture(scope="module", params=["cartpole", "pendulum"])
def fitted(request, tiny_data, tmp_path_factory):
    """One tiny fit per environment (Discrete and Box actions), shared by the tests below."""
    recorder = QNetRecorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tiny_data.root))
        model, dm, trainer = tiny_fit(tiny_data.ids(request.param), tmp_path_factory.mktemp("fit"),
                                      callbacks=[recorder])
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return dict(env=request.param, model=model, dm=dm, trainer=trainer, recorder=recorder, metrics=metrics)


# ----------------------------------------------------------------------------- fit
def test_fit_counts_one_update_per_training_step(fitted):
    model, trainer = fitted["model"], fitted["trainer"]
    assert model.updates == UPDATES == len(fitted["recorder"].q_after_update)
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == UPDATES
    assert trainer.global_step == 2 * UPDATES  # Lightning counts the Q and the reward optimizer steps


def test_fit_logs_finite_q_cql_reward_and_throughput_metrics(fitted):
    metrics = fitted["metrics"]
    missing = [k for k in LOGGED if k not in metrics]
    assert not missing, f"not logged: {missing}; logged: {sorted(metrics)}"
    assert all(math.isfinite(metrics[k]) for k in LOGGED), {k: metrics[k] for k in LOGGED}
    assert metrics["train/updates"] == UPDATES
    assert metrics["train/updates_per_sec"] > 0  # measured every 5 updates
    assert metrics["reward/std"] > 0 and metrics["q/td_loss"] > 0 and metrics["reward/loss"] > 0
    if fitted["env"] == "cartpole":  # exact soft value: T logsumexp(Q/T) > Q(s, a) for every action
        assert metrics["cql/gap"] > 0


def test_target_network_is_the_polyak_average_of_q_net(fitted):
    model, recorder = fitted["model"], fitted["recorder"]
    tau = next(cb for cb in fitted["trainer"].callbacks if isinstance(cb, TargetNetworkUpdate)).tau
    assert tau == 0.005
    expected = [p.clone() for p in recorder.target_start]
    for q in recorder.q_after_update:
        expected = [torch.lerp(t, p, tau) for t, p in zip(expected, q)]
    target = list(model.target_q_net.parameters())
    online = list(model.q_net.parameters())
    for got, want, start, q in zip(target, expected, recorder.target_start, online):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert (got - start).abs().max() > 0  # it moved ...
        assert (got - start).abs().max() < (q - start).abs().max()  # ... but lags behind q_net
    assert max((t - q).abs().max().item() for t, q in zip(target, online)) > 1e-4


def test_a_configured_target_update_replaces_the_default_one(tiny, tmp_path):
    hard = TargetNetworkUpdate(hard_every_n_updates=5)
    model, _, trainer = tiny_fit(tiny.ids("cartpole"), tmp_path, callbacks=[hard])
    assert [cb for cb in trainer.callbacks if isinstance(cb, TargetNetworkUpdate)] == [hard]
    # 20 updates: the last one was followed by a hard copy.
    assert all(torch.equal(t, q) for t, q in zip(model.target_q_net.parameters(), model.q_net.parameters()))


@pytest.mark.parametrize("slow", [True, False])
def test_bf16_training_on_a_cpu_without_bf16_arithmetic_warns_with_the_fix(tiny, tmp_path, monkeypatch, slow):
    monkeypatch.setattr("bicql_lightning.base.bf16_is_slow_on_cpu", lambda: slow)
    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), batch_size=32, batches_per_epoch=2, val_size=64)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        precision="bf16-mixed", **QUIET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(BiCQLML(**TINY_MODEL), dm)
    told = [str(w.message) for w in caught if "no bf16 instructions" in str(w.message)]
    assert len(told) == int(slow)
    if slow:
        assert "bf16-mixed" in told[0] and "--trainer.precision 32-true" in told[0]


def test_logged_training_rows_are_fresh_for_any_trainer_logging_interval(tiny, tmp_path):
    # Trainer(log_every_n_steps=5) asks for a row every 5 updates; each row must hold the
    # metrics of the update it is filed under, never a copy of an older update's values.
    L.seed_everything(0, verbose=False)
    dm = OfflineIRLDataModule(*tiny.ids("cartpole"), batch_size=32, batches_per_epoch=UPDATES, val_size=64)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(max_epochs=1, logger=logger, log_every_n_steps=5, enable_checkpointing=False, **QUIET)
    trainer.fit(BiCQLML(**TINY_MODEL), dm)
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = [(int(r["step"]), float(r["train/updates"])) for r in csv.DictReader(fh) if r.get("train/updates")]
    assert rows == [(4, 5.0), (9, 10.0), (14, 15.0), (19, 20.0)]  # step is the 0-based update index


def test_resumed_fit_equals_an_uninterrupted_one(tiny, tmp_path):
    # Discrete actions use no global random numbers in training, so a resumed run must
    # reproduce the uninterrupted one bit for bit (model, optimizers, sampler, counters).
    ids = tiny.ids("cartpole")
    straight, straight_dm, _ = tiny_fit(ids, tmp_path / "a", max_epochs=2, batches=10)
    first, _, trainer = tiny_fit(ids, tmp_path / "b", max_epochs=1, batches=10)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, resumed_dm, trainer = tiny_fit(ids, tmp_path / "c", max_epochs=2, batches=10, seed=7,
                                            ckpt_path=tmp_path / "half.ckpt")
    assert first.updates == 10 and resumed.updates == straight.updates == 20
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(straight_dm._generator.get_state(), resumed_dm._generator.get_state())


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_reload_reproduces_policy_reward_and_counters(fitted, tmp_path):
    model, dm, trainer = fitted["model"], fitted["dm"], fitted["trainer"]
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = BiCQLML.load_from_checkpoint(path)
    assert loaded.updates == UPDATES
    assert loaded.hparams.hidden_sizes == [32, 32] and loaded.spaces == dm.spaces

    store = dm.expert_store.tensors
    obs, actions = store["obs"][:64], store["action"][:64]  # raw observations
    torch.manual_seed(0)  # Box acting draws candidates from the global generator
    act_before = model.act(obs.numpy())
    torch.manual_seed(0)
    act_after = loaded.act(obs.numpy())
    np.testing.assert_array_equal(act_before, act_after)
    assert act_before.shape == ((64,) if fitted["env"] == "cartpole" else (64, 1))

    with torch.no_grad():
        rewards = model.reward_net(obs, actions)
        assert torch.equal(loaded.reward_net(obs, actions), rewards)
    assert rewards.std() > 0

    if fitted["env"] == "pendulum":
        assert bool(model.proposal.fitted) and bool(loaded.proposal.fitted)
        enc = model.encoder(obs)
        assert torch.equal(loaded.proposal.mode(loaded.encoder(obs)), model.proposal.mode(enc))
    else:
        assert model.proposal is None and loaded.proposal is None


def test_greedy_action_is_a_function_of_the_observation(fitted):
    # act(deterministic=True) must not depend on the global random state: the same
    # observations give the same actions, call after call (rollout evaluations rely on it).
    model, dm = fitted["model"], fitted["dm"]
    obs = dm.expert_store.tensors["obs"][:32].numpy()
    torch.manual_seed(1)
    first = model.act(obs, deterministic=True)
    torch.manual_seed(2)
    np.testing.assert_array_equal(model.act(obs, deterministic=True), first)


def test_the_default_controllers_prior_is_fitted_once_and_travels_with_the_checkpoint(tiny, tmp_path):
    model, dm, trainer = tiny_fit(tiny.ids("pendulum"), tmp_path / "a")
    prior = model.policy.prior
    assert bool(model.policy.fitted) and not any(p.requires_grad for p in prior.parameters())
    # Fitted to the expert pairs: it explains the demonstrations' actions far better than a
    # fresh network (measured: NLL -0.82 against 2.29 nats).
    obs, actions = dm.pairs("expert")
    fresh = BiCQLML(**TINY_MODEL, spaces=dm.spaces)
    fresh.encoder.load_state_dict(model.encoder.state_dict())
    with torch.no_grad():
        nll = prior.loss(model.encoder(obs), actions)[0]
        nll_fresh = fresh.policy.prior.loss(fresh.encoder(obs), actions)[0]
    assert nll < nll_fresh - 1.0

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = BiCQLML.load_from_checkpoint(path)
    raw = obs[:32].numpy()
    np.testing.assert_array_equal(loaded.act(raw), model.act(raw))
    # Resuming trains on; the prior is not fitted again.
    weights = [p.clone() for p in prior.parameters()]
    resumed, _, _ = tiny_fit(tiny.ids("pendulum"), tmp_path / "b", max_epochs=2, ckpt_path=path)
    assert resumed.updates == 2 * UPDATES
    for a, b in zip(weights, resumed.policy.prior.parameters()):
        assert torch.equal(a, b)


def pendulum_reward(obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's reward from its observation (cos, sin, angular velocity) and torque."""
    theta = torch.atan2(obs[:, 1], obs[:, 0])
    return -(theta.pow(2) + 0.1 * obs[:, 2].pow(2) + 0.001 * actions[:, 0].pow(2))


def test_by_default_the_prior_is_refitted_to_all_of_d_weighted_by_the_modules_soft_advantages(
        tiny, tmp_path, monkeypatch):
    # The environment's reward stands in for the module's advantages, so the weights are known.
    monkeypatch.setattr(BiCQLML, "soft_advantages", lambda self, obs, actions: pendulum_reward(obs, actions))
    model, dm, trainer = tiny_fit(tiny.ids("pendulum"), tmp_path, data_kwargs={"expert_subsample": 10})
    assert dm.consecutive_share("expert") == 0.0  # sparse demonstrations: D's relabelled prior acts
    assert bool(model.policy.relabeled) and model.policy.revision == 1
    from bicql_lightning.policies import advantage_weights
    weights = advantage_weights(pendulum_reward(*dm.pairs("offline")))
    share = float(weights.sum() ** 2 / weights.pow(2).sum() / weights.numel())
    assert float(trainer.callback_metrics["policy/relabeled_share"]) == pytest.approx(share, rel=1e-5)
    assert 0.05 < share < 0.95  # a weighted fit to D, neither one transition nor all alike


def test_soft_advantages_are_q_at_the_data_action_minus_the_soft_value(tiny, tmp_path):
    model, dm, _ = tiny_fit(tiny.ids("pendulum"), tmp_path)
    obs, actions = dm.pairs("offline")
    model._make_generator(5)
    adv = model.soft_advantages(obs[:64], actions[:64], chunk=16)
    model._make_generator(5)
    with torch.no_grad():
        want = torch.cat([model._min_q({"obs": obs[i:i + 16], "action": actions[i:i + 16]})
                          - model._min_soft_value(model.q_net, obs[i:i + 16], generator=model._rng())
                          for i in range(0, 64, 16)])
    torch.testing.assert_close(adv, want)
    assert adv.shape == (64,) and bool(torch.isfinite(adv).all())


def test_after_training_the_prior_is_refitted_to_the_episodes_the_reward_ranks_expert_like(
        tiny, tmp_path, monkeypatch):
    unfiltered, dm, _ = tiny_fit(tiny.ids("pendulum"), tmp_path / "a",
                                 model_kwargs={"policy": {"init_args": {**TINY_MODEL["policy"]["init_args"],
                                                                        "relabel": False}}})
    # The environment's reward stands in for a learned one that ranks the episodes well.
    monkeypatch.setattr(BiCQLML, "learned_rewards", lambda self, obs, actions: pendulum_reward(obs, actions))

    class Relabeled(Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # before FitPolicy's (configured ones come first)
            self.seen = getattr(self, "seen", []) + [bool(pl_module.policy.relabeled)]
    seen = Relabeled()
    evaluation = RolloutEvaluation(every_n_updates=UPDATES, episodes=1)
    episodes_rule = {"policy": {"init_args": {**TINY_MODEL["policy"]["init_args"], "relabel_weights": "episodes",
                                              "relabel": True}}}
    model, dm, trainer = tiny_fit(tiny.ids("pendulum"), tmp_path / "b", max_epochs=2, callbacks=[seen, evaluation],
                                  model_kwargs=episodes_rule)
    assert seen.seen == [False, False]  # refitted neither before training nor after the first epoch
    assert bool(model.policy.relabeled) and model.policy.revision == 1
    # The last update's evaluation came before the refit: the final one was run again after it.
    assert evaluation.last["policy_revision"] == 1 and evaluation.last["updates"] == 2 * UPDATES
    # D = 3 random episodes + the 2 expert ones: the expert ones are kept, and of the logged
    # ones the episode the reward ranks highest.
    obs, actions = dm.pairs("offline")
    episodes = dm.episodes("offline")
    expert_rows = episodes >= 3
    assert torch.equal(expert_rows, dm.expert_in_offline())
    per_step = pendulum_reward(obs, actions).double()
    means = torch.stack([per_step[episodes == k].mean() for k in range(3)])
    best = episodes == int(means.argmax())
    want = float((expert_rows | best).float().mean())
    assert float(trainer.callback_metrics["policy/relabeled_share"]) == pytest.approx(want)
    with torch.no_grad():  # negative log-likelihood of the demonstrations' actions
        nll = [float(prior.loss(model.encoder(obs[expert_rows]), actions[expert_rows])[0])
               for prior in (model.policy.relabeled_prior, model.policy.prior)]
    # D's expert-like episodes' prior explains the demonstrations about as D_E's own prior does.
    assert nll[0] < nll[1] + 0.2
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = BiCQLML.load_from_checkpoint(path)
    assert loaded.policy.revision == 1 and bool(loaded.policy.relabeled)
    raw = obs[:32].numpy()
    np.testing.assert_array_equal(loaded.act(raw), model.act(raw))
    # Where D is D_E nothing is refitted: D_E's prior stays the one acting.
    only, _, _ = tiny_fit((tiny.pendulum_expert, None), tmp_path / "c")
    assert not bool(only.policy.relabeled) and only.policy.revision == 0
    assert not bool(unfiltered.policy.relabeled)  # relabel=False keeps D_E's prior


def test_by_default_whole_demonstrations_beside_d_act_with_their_own_prior_tilted_by_q(tiny, tmp_path):
    model, dm, trainer = tiny_fit(tiny.ids("pendulum"), tmp_path)
    assert dm.consecutive_share("expert") == 0.98  # two whole demonstrations of 50 steps
    assert not bool(model.policy.relabeled) and model.policy.revision == 0
    assert model.policy.acting_prior is model.policy.prior and not model.policy.acts_untilted
    assert float(trainer.callback_metrics["policy/relabeled_share"]) == 0.0


def test_reward_net_from_checkpoint_scores_raw_observations_like_the_model(fitted, tmp_path):
    model, dm, trainer = fitted["model"], fitted["dm"], fitted["trainer"]
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    net = RewardNet.from_checkpoint(path)
    assert not net.training
    # The normalisation travels with the network: the data module's statistics, not (0, 1).
    assert torch.equal(net.encoder.mean, dm.obs_mean) and torch.equal(net.encoder.std, dm.obs_std)
    assert dm.obs_mean.abs().max() > 1e-3 and (dm.obs_std - 1).abs().max() > 1e-3
    store = dm.offline_store.tensors
    obs, actions = store["obs"][:100].numpy(), store["action"][:100].numpy()
    with torch.no_grad():
        want = model.reward_net(torch.as_tensor(obs), torch.as_tensor(actions)).numpy()
    np.testing.assert_array_equal(net.predict(obs, actions), want)
    assert net.predict(obs[0], actions[0]) == pytest.approx(want[0], abs=1e-6)  # one transition


def test_auto_termination_reads_the_data_and_travels_with_the_checkpoint(fitted, tmp_path):
    model, dm, trainer = fitted["model"], fitted["dm"], fitted["trainer"]
    store = dm.offline_store.tensors
    with torch.no_grad():
        rewards = model.reward_net(store["obs"], store["action"])
    bound = model.hparams.reward_bound
    if fitted["env"] == "cartpole":
        # The expert balances until the time limit; D's noisier episodes fall.
        assert dm.terminations("expert") == 0 and dm.terminations("offline") > 0
        assert model.termination == "failure" and float(model.reward_net.offset) == bound
        assert rewards.min() >= 0.0 and rewards.max() <= 2 * bound
    else:
        # Pendulum never terminates: the symmetric range, no offset.
        assert dm.terminations("offline") == 0
        assert model.termination == "neutral" and float(model.reward_net.offset) == 0.0
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert float(RewardNet.from_checkpoint(path).offset) == float(model.reward_net.offset)
    assert BiCQLML.load_from_checkpoint(path).termination == model.termination


class PlainModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def foreign_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=root, **QUIET)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer.fit(PlainModule(), data)
    trainer.save_checkpoint(root / "plain_lightning.ckpt")
    torch.save({"weights": torch.randn(3), "note": "not a model"}, root / "random_dict.pt")
    (root / "notes.txt").write_text("this is no checkpoint\n")
    return root


LOADERS = {"BiCQLML.load_from_checkpoint": BiCQLML.load_from_checkpoint,
           "RewardNet.from_checkpoint": RewardNet.from_checkpoint}


@pytest.mark.parametrize("loader", LOADERS.values(), ids=LOADERS.keys())
@pytest.mark.parametrize(("name", "message"), [
    ("plain_lightning.ckpt", "was not written by a bicql-lightning model"),
    ("random_dict.pt", "was not written by a bicql-lightning model"),
    ("notes.txt", "cannot be read"),
    ("missing.ckpt", "does not exist"),
])
def test_loading_a_foreign_or_missing_checkpoint_raises_checkpoint_error(foreign_checkpoints, loader, name,
                                                                         message):
    path = foreign_checkpoints / name
    with pytest.raises(CheckpointError, match=message) as err:
        loader(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- reward wrapper
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_learned_reward_wrapper_returns_the_learned_reward_and_keeps_the_true_one(env_id):
    torch.manual_seed(0)
    plain, wrapped_env = gym.make(env_id), gym.make(env_id)
    net = RewardNet(space_spec(plain.observation_space, plain.action_space), [32, 32], reward_bound=5.0)
    wrapped = LearnedRewardWrapper(wrapped_env, net)
    obs, _ = wrapped.reset(seed=3)
    plain_obs, _ = plain.reset(seed=3)
    actions = [0, 1, 1, 0, 1] if env_id == "CartPole-v1" else [np.array([a], np.float32) for a in (-2, 0.5, 2, 1, -1)]
    for action in actions:
        obs_before = obs
        obs, reward, terminated, truncated, info = wrapped.step(action)
        plain_obs, true_reward, *_ = plain.step(action)
        np.testing.assert_array_equal(obs, plain_obs)  # the dynamics are untouched
        assert reward == pytest.approx(float(net.predict(obs_before, np.asarray(action))), abs=0)
        assert info["true_reward"] == true_reward
        assert reward != pytest.approx(true_reward)
    assert isinstance(reward, float)


# ----------------------------------------------------------------------------- rollout evaluation
def test_rollout_evaluation_reports_normalised_score_and_writes_summary(tiny, tmp_path, capsys):
    callback = RolloutEvaluation(every_n_updates=0, episodes=2)
    logger = CSVLogger(tmp_path, name="logs")
    model, dm, trainer = tiny_fit(tiny.ids("cartpole"), tmp_path, callbacks=[callback], logger=logger)
    last = callback.last
    random_return, expert_return = dm.ref_scores
    assert (random_return, expert_return) == (pytest.approx(27.1), 60.0)  # tiny datasets' metadata
    assert last["random_return"] == random_return and last["expert_return"] == expert_return
    assert last["updates"] == UPDATES and len(last["returns"]) == 2
    # The returns are those of the module's greedy policy on seeds 10000 and 10001 ...
    replay = evaluate_policy(gym.make(dm.env_spec), lambda obs, rng: model.act(obs), [10000, 10001])
    assert last["returns"] == replay.tolist()
    assert last["return"] == pytest.approx(np.mean(replay))
    # ... and the score is 100 (R - R_random) / (R_expert - R_random).
    assert last["normalized_score"] == pytest.approx(100 * (last["return"] - 27.1) / (60.0 - 27.1))

    summary = Path(trainer.log_dir) / "rollout_summary.json"
    assert summary.parent == tmp_path / "logs" / "version_0"
    assert json.loads(summary.read_text()) == last
    out = capsys.readouterr().out
    assert f"normalised score:          {last['normalized_score']:.1f}" in out
    with open(Path(trainer.log_dir) / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("eval/return")]
    assert [float(r["eval/return"]) for r in rows] == pytest.approx([last["return"]])
    assert float(rows[0]["eval/normalized_score"]) == pytest.approx(last["normalized_score"], rel=1e-5)


# ----------------------------------------------------------------------------- command line
TINY_CONFIG = """\
trainer:
  max_epochs: 1
  log_every_n_steps: 5
  enable_progress_bar: false
  callbacks:
    - class_path: bicql_lightning.TargetNetworkUpdate
      init_args:
        tau: 0.005
    - class_path: bicql_lightning.RolloutEvaluation
      init_args:
        every_n_updates: 0
        episodes: 1
model:
  hidden_sizes: [32, 32]
  reward_hidden_sizes: [32, 32]
"""


def test_cli_fit_quickstart_config_made_tiny_trains_and_prints_the_summary(tiny, tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    run = bicql(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--config", "tiny.yaml",
                 "--data.expert_dataset", tiny.cartpole_expert, "--data.offline_dataset", tiny.cartpole_mixed,
                 "--data.batch_size", "32", "--data.batches_per_epoch", str(UPDATES), "--data.val_size", "64",
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "run")],
                env={"MINARI_DATASETS_PATH": str(tiny.root)}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.search(r"learned controller return: (-?[\d.]+) ± [\d.]+\n\s+expert return:\s+([\d.]+)\n"
                      r"\s+random return:\s+([\d.]+)\n\s+normalised score:\s+(-?[\d.]+)", run.stdout)
    assert found, run.stdout[-2000:]
    ret, expert, random_, score = map(float, found.groups())
    assert (expert, random_) == (60.0, 27.1)
    assert score == pytest.approx(100 * (ret - random_) / (expert - random_), abs=0.06)

    version = tmp_path / "run" / "quickstart" / "version_0"  # the config's logger: no nested directories
    checkpoints = sorted((version / "checkpoints").glob("*.ckpt"))
    assert [c.name for c in checkpoints] == [f"epoch=0-step={2 * UPDATES}.ckpt"]
    assert BiCQLML.load_from_checkpoint(checkpoints[0]).updates == UPDATES
    assert json.loads((version / "rollout_summary.json").read_text())["return"] == ret
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["data"]["expert_dataset"] == tiny.cartpole_expert
    assert saved["model"]["init_args"]["hidden_sizes"] == [32, 32]
    assert not (tmp_path / "lightning_logs").exists()  # the quickstart's default_root_dir was overridden


def test_cli_print_config_shows_every_model_and_data_argument(tmp_path):
    run = bicql(["fit", "--print_config"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    config = yaml.safe_load(run.stdout)
    # `spaces` is linked from the data module (data.spaces -> model.spaces), so it is no option.
    model_args = {n: p.default for n, p in inspect.signature(BiCQLML.__init__).parameters.items()
                  if n not in ("self", "spaces")}
    data_args = {n: p.default for n, p in inspect.signature(OfflineIRLDataModule.__init__).parameters.items()
                 if n != "self"}
    assert config["model"]["class_path"] == "bicql_lightning.BiCQLML"
    assert config["model"]["init_args"] == model_args
    assert config["data"] == data_args


def test_cli_trains_a_baseline_from_a_bicql_config(tiny, tmp_path):
    # The same data and config with another model of the collection: behaviour cloning.
    run = bicql(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model", "bicql_lightning.BehaviorCloning",
                 "--model.hidden_sizes", "[16]", "--data.expert_dataset", tiny.cartpole_expert,
                 "--data.offline_dataset", "null", "--data.batch_size", "16", "--data.batches_per_epoch", "10",
                 "--data.val_size", "16", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path)],
                cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "normalised score" in run.stdout
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["model"]["class_path"] == "bicql_lightning.BehaviorCloning"


def test_cli_rejects_a_misspelt_option_naming_it(tmp_path):
    run = bicql(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--model.alpah", "1"], cwd=tmp_path)
    assert run.returncode != 0
    assert "alpah" in run.stderr
    assert not (tmp_path / "lightning_logs").exists()


def test_cli_refuses_an_optimizer_option_at_parse_time(tiny, tmp_path):
    # BiCQLML optimises manually with two optimizers of its own; LightningCLI's generic
    # --optimizer would replace them with one and crash inside training_step.
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG)
    run = bicql(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--config", "tiny.yaml",
                 "--data.expert_dataset", tiny.cartpole_expert, "--data.offline_dataset", tiny.cartpole_mixed,
                 "--data.batches_per_epoch", "2", "--optimizer", "Adam",
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "run")],
                env={"MINARI_DATASETS_PATH": str(tiny.root)}, cwd=tmp_path)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-1500:]
    assert "--optimizer" in run.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_cli_dataset_writes_a_dataset_and_refuses_to_overwrite_it(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    args = ["dataset", "--env", "CartPole-v1", "--policy", "builtin", "--dataset-id", "tst/cp/x-v0", "--no-progress"]
    run = bicql(args + ["--episodes", "2"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote tst/cp/x-v0" in run.stdout and "2 episodes, 1000 transitions, mean return 500.00" in run.stdout
    ds = minari.load_dataset("tst/cp/x-v0")
    assert ds.total_episodes == 2 and ds.total_steps == 1000

    def digest() -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    before = digest()
    again = bicql(args + ["--episodes", "3", "--seed", "5"], cwd=tmp_path)
    assert again.returncode != 0
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    assert digest() == before
    assert minari.load_dataset("tst/cp/x-v0").total_episodes == 2
