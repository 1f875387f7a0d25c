"""Online reward transfer: SAC/PPO trained in the environment on a learned reward
(``examples/sac_on_learned_reward.py``, ``bench.transfer_online``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from bench import transfer_online
from bench.datasets import Task
from bicql_lightning import (BiCQLML, IQLearn, LearnedRewardWrapper, OfflineIRLDataModule, RankedReward, RewardNet,
                             PolicyLogLikelihood, ShapedReward, SoftAdvantage, load_transitions)
from bicql_lightning.spaces import space_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_sizes=[16, 16], reward_hidden_sizes=[16, 16], proposal_hidden_sizes=[16, 16],
            proposal_fit_steps=10, num_action_samples=4,
            policy={"init_args": {"num_candidates": 4, "hidden_sizes": [16], "fit_steps": 10}})


@pytest.fixture(scope="module")
def pendulum_checkpoint(tiny_data, tmp_path_factory) -> Path:
    """A BiCQL-ML checkpoint trained for 20 updates on the tiny Pendulum data."""
    path = tmp_path_factory.mktemp("ckpt") / "bicql.ckpt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tiny_data.root))
        pl.seed_everything(0, verbose=False)
        dm = OfflineIRLDataModule(*tiny_data.ids("pendulum"), batch_size=16, batches_per_epoch=20, val_size=16)
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
        trainer.fit(BiCQLML(**TINY), dm)
        trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("algo, options", [("sac", []), ("ppo", []), ("sac", ["--shaped"]),
                                           ("sac", ["--survival-bonus", "1"])])
def test_example_script_trains_sb3_on_a_bicql_reward_and_scores_it_on_the_true_reward(pendulum_checkpoint, algo,
                                                                                      options, tmp_path):
    saved = tmp_path / "policy.zip"
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "sac_on_learned_reward.py"), str(pendulum_checkpoint),
                          "--env", "Pendulum-v1", "--algo", algo, "--steps", "128", "--episodes", "2",
                          "--save", str(saved)] + options,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{algo} on the learned reward, 128 steps: true return ")
    # Pendulum's true reward is in [-16.3, 0] per step over 200 steps.
    assert -3300 < float(line.split("true return ")[1].split()[0]) <= 0
    assert saved.exists()


class RecordingReward:
    """A reward object with imitation's ``predict(state, action, next_state, done)``."""

    def __init__(self):
        self.calls = []

    def predict(self, state, action, next_state, done):
        self.calls.append((state, action, next_state, done))
        return np.array([float(np.sum(next_state) - np.sum(state))])


def test_learned_reward_wrapper_gives_a_reward_object_the_whole_transition():
    reward = RecordingReward()
    env = LearnedRewardWrapper(gym.make("Pendulum-v1"), reward)
    plain = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=1)
    plain.reset(seed=1)
    for a in (0.5, -1.0, 2.0):
        before = obs
        obs, r, terminated, truncated, info = env.step(np.array([a], np.float32))
        _, true_r, *_ = plain.step(np.array([a], np.float32))
        state, action, next_state, done = reward.calls[-1]
        np.testing.assert_array_equal(state, before)
        np.testing.assert_array_equal(next_state, obs)
        assert float(action[0]) == a and bool(done) is terminated
        assert r == pytest.approx(float(np.sum(obs) - np.sum(before)), abs=1e-6)
        assert info["true_reward"] == true_r


def test_a_survival_bonus_is_added_to_every_learned_step_and_the_true_reward_is_kept():
    plain = LearnedRewardWrapper(gym.make("Pendulum-v1"), RecordingReward())
    bonus = LearnedRewardWrapper(gym.make("Pendulum-v1"), RecordingReward(), survival_bonus=1.5)
    plain.reset(seed=3)
    bonus.reset(seed=3)
    for a in (0.5, -1.0, 2.0):
        action = np.array([a], np.float32)
        _, r0, _, _, info0 = plain.step(action)
        _, r1, _, _, info1 = bonus.step(action)
        assert r1 == pytest.approx(r0 + 1.5, abs=1e-9)
        assert info1["true_reward"] == info0["true_reward"]


@pytest.mark.parametrize("bonus", [float("nan"), float("inf")])
def test_a_survival_bonus_that_is_not_a_finite_number_is_refused_in_one_line(bonus):
    with pytest.raises(ValueError, match="survival_bonus must be a finite number"):
        LearnedRewardWrapper(gym.make("Pendulum-v1"), RecordingReward(), survival_bonus=bonus)


def test_iqlearn_adapter_is_iqlearns_batched_reward_one_transition_at_a_time():
    env = gym.make("Pendulum-v1")
    torch.manual_seed(0)
    model = IQLearn(spaces=space_spec(env.observation_space, env.action_space), hidden_sizes=[16],
                    actor_hidden_sizes=[16])
    rng = np.random.default_rng(0)
    obs, next_obs = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    act, done = rng.uniform(-2, 2, size=(5, 1)).astype(np.float32), np.array([0, 0, 1, 0, 1], np.float32)
    batched = model.predict_reward(obs, act, next_obs, done)
    adapter = transfer_online.IQLearnReward(model)
    one_by_one = [float(adapter.predict(obs[i], act[i], next_obs[i], done[i])[0]) for i in range(5)]
    np.testing.assert_allclose(one_by_one, batched, rtol=1e-5, atol=1e-5)


def test_constant_source_pays_one_per_step_and_keeps_the_true_reward():
    env = transfer_online.ConstantReward(gym.make("Pendulum-v1"))
    env.reset(seed=0)
    _, r, _, _, info = env.step(np.array([0.0], np.float32))
    assert r == 1.0 and info["true_reward"] < 0


@pytest.mark.parametrize("text, parsed", [("true", ("true", None)), ("constant", ("constant", None)),
                                          ("bicql:with-mixed:sub20:1", ("bicql", ("with-mixed", "sub20", 1))),
                                          ("bicql_shaped:with-mixed:sub20:1",
                                           ("bicql_shaped", ("with-mixed", "sub20", 1))),
                                          ("bicql_bonus:with-mixed:sub20:1",
                                           ("bicql_bonus", ("with-mixed", "sub20", 1))),
                                          ("bicql_ranked:with-medium:sub20:1",
                                           ("bicql_ranked", ("with-medium", "sub20", 1))),
                                          ("bicql_advantage:with-mixed:sub20:1",
                                           ("bicql_advantage", ("with-mixed", "sub20", 1))),
                                          ("bicql_likelihood:with-mixed:sub20:1",
                                           ("bicql_likelihood", ("with-mixed", "sub20", 1))),
                                          ("bicql_relative_likelihood:with-mixed:sub20:1",
                                           ("bicql_relative_likelihood", ("with-mixed", "sub20", 1))),
                                          ("iqlearn_bonus:with-mixed:sub20:1",
                                           ("iqlearn_bonus", ("with-mixed", "sub20", 1))),
                                          ("iqlearn:expert-only:full:10", ("iqlearn", ("expert-only", "full", 10)))])
def test_reward_sources_parse(text, parsed):
    assert transfer_online.parse_source(text) == parsed


@pytest.mark.parametrize("text", ["bicql", "bc:with-mixed:sub20:1", "bicql:with-mixed:1", "true:x"])
def test_an_unknown_reward_source_is_refused_with_the_forms_that_work(text):
    with pytest.raises(argparse.ArgumentTypeError, match="use true, constant, bicql:REGIME:DEMOS:N"):
        transfer_online.parse_source(text)


def test_a_run_records_one_true_reward_evaluation_per_interval(pendulum_checkpoint, monkeypatch, tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    ckpt_dir.mkdir()
    task = Task(name="pendulum", env_id="Pendulum-v1", env_kwargs={}, expert_file=tmp_path / "unused.npz")
    target = transfer_online.source_checkpoint(ckpt_dir, task, "bicql:with-mixed:sub20:1", seed=0)
    assert target.name == "bicql_pendulum_with-mixed_sub20_n1_seed0.ckpt"  # the name bench.run saves under
    target.write_bytes(pendulum_checkpoint.read_bytes())
    monkeypatch.setattr(transfer_online, "references", lambda task: (-1200.0, -150.0))
    torch.set_num_threads(1)
    row = transfer_online.train(task, "bicql:with-mixed:sub20:1", 0, steps=120, eval_every=60, checkpoint=target,
                                settings={"learning_starts": 40}, verbose=False)
    assert [p["steps"] for p in row["curve"]] == [60, 120]
    scores = [p["normalized_score"] for p in row["curve"]]
    assert all(np.isfinite(scores))
    for p in row["curve"]:
        assert p["normalized_score"] == pytest.approx(100 * (p["return"] + 1200) / 1050)
    assert row["normalized_score"] == scores[-1] and row["auc"] == pytest.approx(np.mean(scores))
    assert all(p["length"] == 200 and np.isfinite(p["source_return"]) for p in row["curve"])
    assert row["source"] == "bicql:with-mixed:sub20:1" and row["sac_settings"]["learning_starts"] == 40
    json.dumps(row)  # one JSON line
    # The reward SAC saw is the checkpoint's RewardNet.
    env = transfer_online.make_env(task, "bicql:with-mixed:sub20:1", target)
    net = RewardNet.from_checkpoint(target)
    obs, _ = env.reset(seed=0)
    _, r, *_ = env.step(np.array([1.0], np.float32))
    assert r == pytest.approx(float(net.predict(obs, np.array([1.0], np.float32))), abs=1e-6)


def bicql_source_env(pendulum_checkpoint, tmp_path, source: str, seed: int):
    """``source``'s Pendulum environment, its checkpoint where ``bench.run`` would save that seed's."""
    task = Task(name="pendulum", env_id="Pendulum-v1", env_kwargs={}, expert_file=tmp_path / "unused.npz")
    target = transfer_online.source_checkpoint(tmp_path, task, source, seed=seed)
    assert target.name == f"bicql_pendulum_with-mixed_sub20_n1_seed{seed}.ckpt"
    target.write_bytes(pendulum_checkpoint.read_bytes())
    return transfer_online.make_env(task, source, target), target


def test_the_shaped_source_reads_the_bicql_checkpoint_and_pays_its_shaped_reward(pendulum_checkpoint, tmp_path):
    env, target = bicql_source_env(pendulum_checkpoint, tmp_path, "bicql_shaped:with-mixed:sub20:1", seed=2)
    shaped = ShapedReward.from_checkpoint(target)
    obs, _ = env.reset(seed=0)
    action = np.array([-0.5], np.float32)
    next_obs, r, terminated, *_ = env.step(action)
    assert r == pytest.approx(float(shaped.predict(obs, action, next_obs, np.asarray(terminated))), rel=1e-5)
    assert r != pytest.approx(float(RewardNet.from_checkpoint(target).predict(obs, action)), abs=1e-3)


def test_the_bonus_source_pays_the_bicql_reward_plus_the_constant_sources_one(pendulum_checkpoint, tmp_path):
    env, target = bicql_source_env(pendulum_checkpoint, tmp_path, "bicql_bonus:with-mixed:sub20:1", seed=1)
    net = RewardNet.from_checkpoint(target)
    obs, _ = env.reset(seed=0)
    for a in (-0.5, 1.0):
        action = np.array([a], np.float32)
        next_obs, r, *_ = env.step(action)
        assert r == pytest.approx(float(net.predict(obs, action)) + 1.0, abs=1e-5)
        obs = next_obs


def test_the_ranked_source_pays_the_checkpoints_reward_ranked_among_the_cells_offline_pairs(
        pendulum_checkpoint, tiny, monkeypatch, tmp_path):
    task = Task(name="hopper", env_id="Hopper-v5", env_kwargs={}, expert_file=tmp_path / "unused.npz")
    assert transfer_online.ranking_data(task, "bicql_ranked:with-mixed:sub20:1") == "bench/hopper/mixed-v0"
    assert transfer_online.ranking_data(task, "bicql_ranked:with-medium:full:1") == "bench/hopper/medium-v0"
    assert transfer_online.ranking_data(task, "bicql_ranked:expert-only:full:10") == "bench/hopper/expert-n10-v0"
    offline = tiny.ids("pendulum")[1]
    monkeypatch.setattr(transfer_online, "ranking_data", lambda task, source: offline)
    env, target = bicql_source_env(pendulum_checkpoint, tmp_path, "bicql_ranked:with-mixed:sub20:1", seed=0)
    ranked = RankedReward.from_checkpoint(target, offline)
    data = load_transitions(offline)
    assert ranked.predict(data.observations, data.actions).mean() == pytest.approx(0.5)
    obs, _ = env.reset(seed=0)
    for a in (-1.5, 0.7):
        action = np.array([a], np.float32)
        next_obs, r, _, _, info = env.step(action)
        assert 0.0 <= r <= 1.0 and r == pytest.approx(float(ranked.predict(obs, action)), abs=1e-9)
        assert info["true_reward"] < 0
        obs = next_obs


@pytest.mark.parametrize("kind, scorer", [("bicql_advantage", SoftAdvantage.from_checkpoint),
                                           ("bicql_likelihood", PolicyLogLikelihood.from_checkpoint),
                                           ("bicql_relative_likelihood",
                                            lambda path: PolicyLogLikelihood.from_checkpoint(path, relative=True))])
def test_the_advantage_and_likelihood_sources_pay_the_checkpoints_score_ranked_among_the_cells_offline_pairs(
        pendulum_checkpoint, tiny, monkeypatch, tmp_path, kind, scorer):
    task = Task(name="hopper", env_id="Hopper-v5", env_kwargs={}, expert_file=tmp_path / "unused.npz")
    assert transfer_online.ranking_data(task, f"{kind}:with-mixed:sub20:1") == "bench/hopper/mixed-v0"
    offline = tiny.ids("pendulum")[1]
    monkeypatch.setattr(transfer_online, "ranking_data", lambda task, source: offline)
    env, target = bicql_source_env(pendulum_checkpoint, tmp_path, f"{kind}:with-mixed:sub20:1", seed=0)
    score_of = scorer(target)
    data = load_transitions(offline)
    reference = np.sort(score_of(torch.as_tensor(data.observations), torch.as_tensor(data.actions)).numpy())
    obs, _ = env.reset(seed=0)
    for a in (-1.5, 0.7):
        action = np.array([a], np.float32)
        next_obs, r, _, _, info = env.step(action)
        score = float(score_of(*score_of.batch(obs, action)[:2]))
        by_hand = np.interp(score, reference, (np.arange(reference.size) + 0.5) / reference.size, left=0, right=1)
        assert 0.0 <= r <= 1.0 and r == pytest.approx(by_hand, abs=1e-6)
        assert info["true_reward"] < 0
        obs = next_obs


def test_the_ranked_sources_control_draws_the_same_fresh_weights_and_leaves_the_random_state_alone(
        pendulum_checkpoint):
    trained = RewardNet.from_checkpoint(pendulum_checkpoint)
    loaded = RewardNet.from_checkpoint(pendulum_checkpoint)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = transfer_online.untrained(loaded)
    assert torch.equal(torch.get_rng_state(), state)
    second = transfer_online.untrained(RewardNet.from_checkpoint(pendulum_checkpoint))
    for a, b, t in zip(first.net.parameters(), second.net.parameters(), trained.net.parameters()):
        assert torch.equal(a, b) and not torch.equal(a, t)
    assert torch.equal(first.encoder.mean, trained.encoder.mean)  # D's observation normalisation kept


def test_the_iqlearn_bonus_source_pays_iqlearns_reward_plus_one(monkeypatch, tmp_path):
    loaded = []

    def fake_reward(kind, checkpoint):
        loaded.append((kind, checkpoint))
        return RecordingReward()

    monkeypatch.setattr(transfer_online, "learned_reward", fake_reward)
    task = Task(name="pendulum", env_id="Pendulum-v1", env_kwargs={}, expert_file=tmp_path / "unused.npz")
    target = transfer_online.source_checkpoint(tmp_path, task, "iqlearn_bonus:with-mixed:sub20:1", seed=0)
    assert target.name.startswith("iqlearn_")
    env = transfer_online.make_env(task, "iqlearn_bonus:with-mixed:sub20:1", target)
    obs, _ = env.reset(seed=0)
    next_obs, r, *_ = env.step(np.array([0.3], np.float32))
    assert loaded == [("iqlearn", str(target))]
    assert r == pytest.approx(float(np.sum(next_obs) - np.sum(obs)) + 1.0, abs=1e-6)


class FixedAction:
    """A model with SB3's ``predict`` that plays one action everywhere."""

    def __init__(self, action):
        self.action = np.asarray(action, np.float32)

    def predict(self, obs, deterministic=True):
        return np.repeat(self.action[None], len(obs), axis=0), None


def test_evaluation_scores_the_true_reward_whatever_the_source_and_records_what_the_source_paid(tmp_path):
    task = Task(name="hopper", env_id="Hopper-v5", env_kwargs={}, expert_file=tmp_path / "unused.npz")
    model, refs = FixedAction(np.zeros(3)), (0.0, 1000.0)
    true = transfer_online.evaluate(model, task, refs, "true")
    constant = transfer_online.evaluate(model, task, refs, "constant")
    # The wrapper changes the reward only: the same episodes, the same true score.
    assert constant["return"] == true["return"] and constant["length"] == true["length"]
    assert constant["normalized_score"] == pytest.approx(true["return"] / 10)
    assert constant["source_return"] == constant["length"]  # +1 per step
    assert true["source_return"] == true["return"]
    # A hopper that holds still falls over within the time limit, moving little.
    assert 10 < true["length"] < 1000 and abs(true["x_velocity"]) < 1.0
    pendulum = Task(name="pendulum", env_id="Pendulum-v1", env_kwargs={}, expert_file=tmp_path / "unused.npz")
    point = transfer_online.evaluate(FixedAction([0.0]), pendulum, (-1200.0, -150.0), "constant")
    assert point["length"] == 200 and point["x_velocity"] is None  # Pendulum reports no velocity


def test_report_lists_what_each_source_paid_for_where_the_runs_recorded_it(tmp_path):
    def row(source, seed, lengths):
        return {"task": "hopper", "source": source, "seed": seed,
                "curve": [{"steps": 10 * (i + 1), "normalized_score": 1.0, "source_return": 2.0 * n, "length": n,
                           "x_velocity": 0.5} for i, n in enumerate(lengths)]}
    rows = [row("true", 0, [100, 300]), row("true", 1, [200, 500]), row("constant", 0, [1000, 1000]),
            {"task": "hopper", "source": "old", "seed": 0, "curve": [{"steps": 10, "normalized_score": 0.0},
                                                                      {"steps": 20, "normalized_score": 0.0}]}]
    text = transfer_online.report(rows, tmp_path)
    assert "| hopper | true | 2 | 20 | 800.00 | 400.00 | 0.50 |" in text
    assert "| hopper | constant | 1 | 20 | 2000.00 | 1000.00 | 0.50 |" in text
    assert "| hopper | old |" in text and text.count("| hopper | old |") == 1  # in the scores table only
    assert (tmp_path / "diagnostics_hopper.png").stat().st_size > 0


def test_report_compares_sources_at_the_last_evaluation_every_run_reached(tmp_path):
    def row(source, seed, scores):
        return {"task": "hopper", "source": source, "seed": seed,
                "curve": [{"steps": 10 * (i + 1), "normalized_score": s} for i, s in enumerate(scores)]}
    rows = [row("true", 0, [0.0, 20.0, 40.0, 60.0]), row("true", 1, [10.0, 30.0, 50.0, 70.0]),
            row("bicql:with-mixed:sub20:1", 0, [0.0, 10.0, 30.0])]  # stopped after 30 steps
    text = transfer_online.report(rows, tmp_path)
    # Compared at 30 steps: true's mean curve 5, 25, 45 (AUC 25); the learned reward's 0, 10, 30 (AUC 40/3).
    assert "| hopper | true | 2 | 30 | 45.0 | 1.00 |" in text
    assert "| hopper | bicql:with-mixed:sub20:1 | 1 | 30 | 30.0 | 0.53 |" in text
    assert (tmp_path / "curves_hopper.png").stat().st_size > 0


def test_runs_of_a_variant_are_kept_and_reported_apart_from_the_benchmark_default(tmp_path):
    def row(variant, scores):
        r = {"task": "hopper", "source": "bicql:with-mixed:sub20:1", "seed": 0, "steps": 20,
             "curve": [{"steps": 10 * (i + 1), "normalized_score": s} for i, s in enumerate(scores)]}
        return {**r, "variant": variant} if variant else r
    default, data = row(None, [0.0, 6.0]), row("reward_level=data", [10.0, 30.0])
    assert transfer_online.run_key(default) != transfer_online.run_key(data)  # a variant run is not skipped as done
    text = transfer_online.report([row(None, [0.0, 0.0]) | {"source": "true"}, default, data], tmp_path)
    assert "| hopper | bicql:with-mixed:sub20:1 | 1 | 20 | 6.0 |" in text
    assert "| hopper | bicql:with-mixed:sub20:1 (reward_level=data) | 1 | 20 | 30.0 |" in text


def test_ranked_pay_reports_the_mean_rank_per_step_on_logged_pairs_and_on_rollouts(pendulum_checkpoint, tiny,
                                                                                    tmp_path):
    from bench.ranked_pay import pay

    class TinyPendulum(Task):
        def dataset_id(self, kind: str) -> str:
            return {"expert-n1": tiny.pendulum_expert, "mixed": tiny.pendulum_mixed}[kind]

    task = TinyPendulum(name="pendulum", env_id="Pendulum-v1", env_kwargs={}, expert_file=tmp_path / "unused.npz")
    out = pay(str(pendulum_checkpoint), task, "log_likelihood", "mixed", episodes=1)
    assert list(out) == ["expert-n1", "mixed", "expert states, zero action", "expert states, random action",
                         "zero rollouts", "random rollouts", "controller rollouts"]  # no medium policy, no medium row
    assert out["mixed"]["mean"] == pytest.approx(0.5)  # D's own pairs average the middle rank
    assert all(0.0 <= row["mean"] <= 1.0 for row in out.values())
    for name in ("zero rollouts", "random rollouts", "controller rollouts"):
        assert out[name]["pairs"] == 200 and -3300 < out[name]["true_return"] <= 0  # Pendulum: 200 steps
    assert out["expert states, zero action"]["pairs"] == out["expert-n1"]["pairs"]
