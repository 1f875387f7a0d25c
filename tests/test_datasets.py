"""Tests for bicql_lightning.datasets and bicql_lightning.experts (seeded, offline, fast)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from bicql_lightning.datasets import (
    DatasetError,
    collect_dataset,
    ensure_quickstart_datasets,
    evaluate_policy,
    load_minari,
    load_transitions,
    main,
)
from bicql_lightning.experts import (
    BUILTIN_EXPERTS,
    MLPExpert,
    cartpole_expert,
    epsilon_random,
    pendulum_expert,
    random_policy,
    sample_action,
)

HOPPER_NPZ = Path("/work/shared/experts/hopper.npz")
CARTPOLE_SPACE = gym.spaces.Discrete(2)
PENDULUM_SPACE = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)


@pytest.fixture(autouse=True)
def minari_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Private Minari root per test; minari reads the variable on every call."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def noisy_cartpole(epsilon: float = 0.6):
    return epsilon_random(cartpole_expert, epsilon, CARTPOLE_SPACE)


def test_collect_and_load_round_trip(minari_root: Path) -> None:
    ds = collect_dataset("tst/cart-v0", "CartPole-v1", noisy_cartpole(), 3, seed=0, progress=False)
    assert (minari_root / "tst" / "cart-v0" / "data").is_dir()
    episodes = list(ds.iterate_episodes())
    lengths = [len(ep.rewards) for ep in episodes]
    assert lengths == [15, 182, 95]
    assert [bool(ep.terminations[-1]) for ep in episodes] == [True, True, True]
    assert [ep["seed"] for ep in ds.storage.get_episode_metadata(range(3))] == [0, 1, 2]

    tr = load_transitions("tst/cart-v0")
    n = sum(lengths)
    assert len(tr) == n == 292 and tr.num_episodes == 3 and tr.dataset_ids == ["tst/cart-v0"]
    assert tr.observations.shape == tr.next_observations.shape == (n, 4)
    assert tr.observations.dtype == np.float32
    assert tr.actions.shape == (n,) and tr.actions.dtype == np.int64
    assert set(np.unique(tr.actions)) <= {0, 1}
    assert tr.rewards.dtype == np.float32 and tr.rewards.sum() == pytest.approx(292.0)
    assert tr.terminations.dtype == bool and tr.terminations.sum() == 3
    assert not tr.truncations.any()
    ends = np.cumsum(lengths) - 1
    assert np.flatnonzero(tr.terminations).tolist() == ends.tolist()
    assert np.flatnonzero(tr.episode_starts).tolist() == [0, 15, 197]
    assert np.bincount(tr.episode_ids).tolist() == lengths
    # next_obs is the following observation inside an episode, and the stored T+1-th one at the end.
    inside = np.setdiff1d(np.arange(n - 1), ends)
    np.testing.assert_array_equal(tr.next_observations[inside], tr.observations[inside + 1])
    np.testing.assert_array_equal(tr.next_observations[ends[0]], episodes[0].observations[-1])
    assert tr.observation_space == ds.observation_space and tr.action_space == CARTPOLE_SPACE
    assert tr.env_spec.id == "CartPole-v1" and tr.ref_min_score is None and tr.ref_max_score is None

    env = minari.load_dataset("tst/cart-v0").recover_environment()
    assert env.spec.id == "CartPole-v1" and env.spec.max_episode_steps == 500
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, tr.observations[0])


def test_collection_is_deterministic() -> None:
    collect_dataset("tst/a-v0", "Pendulum-v1", epsilon_random(pendulum_expert, 0.5, PENDULUM_SPACE), 2,
                    seed=7, progress=False)
    collect_dataset("tst/b-v0", "Pendulum-v1", epsilon_random(pendulum_expert, 0.5, PENDULUM_SPACE), 2,
                    episode_seeds=[7, 8], progress=False)
    collect_dataset("tst/c-v0", "Pendulum-v1", epsilon_random(pendulum_expert, 0.5, PENDULUM_SPACE), 2,
                    seed=9, progress=False)
    a, b, c = (load_transitions(f"tst/{k}-v0") for k in "abc")
    assert len(a) == len(b) == 400
    for key in ("observations", "actions", "rewards", "next_observations", "terminations", "truncations"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert a.actions.shape == (400, 1) and a.actions.dtype == np.float32
    assert a.truncations.sum() == 2 and not a.terminations.any()
    assert not np.array_equal(a.observations, c.observations)


def test_first_n_episodes_over_concatenation() -> None:
    collect_dataset("tst/x-v0", "CartPole-v1", noisy_cartpole(), 3, seed=0, progress=False)
    collect_dataset("tst/y-v0", "CartPole-v1", noisy_cartpole(), 2, seed=10, progress=False)
    x, y = load_transitions("tst/x-v0"), load_transitions("tst/y-v0")
    first_y = int((y.episode_ids == 0).sum())
    both = load_transitions(["tst/x-v0", "tst/y-v0"], num_episodes=4)
    assert both.num_episodes == 4 and len(both) == len(x) + first_y
    np.testing.assert_array_equal(both.observations[: len(x)], x.observations)
    np.testing.assert_array_equal(both.actions[len(x):], y.actions[:first_y])
    assert np.unique(both.episode_ids).tolist() == [0, 1, 2, 3]
    two = load_transitions("tst/x-v0", num_episodes=2)
    assert len(two) == 15 + 182
    with pytest.raises(DatasetError, match="asked for 6 episodes .* hold 5 episodes"):
        load_transitions(["tst/x-v0", "tst/y-v0"], num_episodes=6)
    with pytest.raises(DatasetError, match="asked for 0 episodes"):
        load_transitions("tst/x-v0", num_episodes=0)


def test_mismatched_spaces_are_refused() -> None:
    collect_dataset("tst/cart-v0", "CartPole-v1", cartpole_expert, 1, progress=False)
    collect_dataset("tst/pend-v0", "Pendulum-v1", pendulum_expert, 1, progress=False)
    with pytest.raises(DatasetError) as err:
        load_transitions(["tst/cart-v0", "tst/pend-v0"])
    msg = str(err.value)
    assert "tst/cart-v0" in msg and "tst/pend-v0" in msg and "Discrete(2)" in msg and "Box(" in msg


def test_bad_actions_fail_collection(minari_root: Path) -> None:
    def nan_policy(obs, rng):
        return np.array([np.nan], dtype=np.float32) if obs[2] > 0 else np.zeros(1, np.float32)

    with pytest.raises(DatasetError, match=r"episode 0 \(seed 3\) step \d+: policy returned a non-finite"):
        collect_dataset("tst/nan-v0", "Pendulum-v1", nan_policy, 2, seed=3, progress=False)
    with pytest.raises(DatasetError, match=r"step 0: .*shape \(2,\), expected \(1,\)"):
        collect_dataset("tst/shape-v0", "Pendulum-v1", lambda o, r: np.zeros(2), 1, progress=False)
    with pytest.raises(DatasetError, match="outside the bounds"):
        collect_dataset("tst/big-v0", "Pendulum-v1", lambda o, r: np.array([3.0]), 1, progress=False)
    with pytest.raises(DatasetError, match="action 2 is outside Discrete"):
        collect_dataset("tst/disc-v0", "CartPole-v1", lambda o, r: 2, 1, progress=False)
    assert minari.list_local_datasets() == {}
    assert not any(p.name.startswith(".bicql-staging") for p in minari_root.iterdir())


def test_nan_reward_in_stored_dataset_is_reported() -> None:
    obs = np.zeros((4, 3), np.float32)
    buffer = EpisodeBuffer(observations=obs, actions=np.zeros((3, 1), np.float32), rewards=[0.0, np.nan, 1.0],
                           terminations=[False] * 3, truncations=[False, False, True])
    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers("tst/nanrew-v0", [buffer], env="Pendulum-v1", data_format="hdf5")
    with pytest.raises(DatasetError, match="'tst/nanrew-v0': field 'rewards' has 1 non-finite"):
        load_transitions("tst/nanrew-v0")


def test_zero_episodes_and_bad_ids() -> None:
    with pytest.raises(DatasetError, match="num_episodes must be >= 1"):
        collect_dataset("tst/zero-v0", "CartPole-v1", cartpole_expert, 0, progress=False)
    with pytest.raises(DatasetError, match="invalid dataset id"):
        collect_dataset("bad id!", "CartPole-v1", cartpole_expert, 1, progress=False)
    with pytest.raises(DatasetError, match="no dataset id"):
        load_transitions([])


def test_existing_dataset_needs_overwrite(minari_root: Path) -> None:
    collect_dataset("tst/keep-v0", "CartPole-v1", noisy_cartpole(), 2, seed=0, progress=False)
    before = load_transitions("tst/keep-v0")
    with pytest.raises(DatasetError, match="already exists at .*overwrite=True"):
        collect_dataset("tst/keep-v0", "CartPole-v1", noisy_cartpole(), 2, seed=50, progress=False)
    np.testing.assert_array_equal(load_transitions("tst/keep-v0").observations, before.observations)

    collect_dataset("tst/keep-v0", "CartPole-v1", noisy_cartpole(), 1, seed=50, overwrite=True, progress=False)
    after = load_transitions("tst/keep-v0")
    assert after.num_episodes == 1 and not np.array_equal(after.observations[:5], before.observations[:5])
    assert sorted(p.name for p in minari_root.iterdir()) == ["tst"]  # no staging / trash left over


def test_unknown_id_offline_is_a_clear_error(minari_root: Path) -> None:
    start = time.monotonic()
    with pytest.raises(DatasetError) as err:
        load_minari("nobody/no-such-dataset-v0")
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "nobody/no-such-dataset-v0" in msg and str(minari_root) in msg and "bicql dataset" in msg
    with pytest.raises(DatasetError, match="download=False"):
        load_transitions("nobody/no-such-dataset-v0", download=False)


def test_builtin_experts_scores() -> None:
    cart = evaluate_policy("CartPole-v1", BUILTIN_EXPERTS["CartPole-v1"], seeds=range(5))
    assert cart.mean() >= 495
    pend = evaluate_policy("Pendulum-v1", BUILTIN_EXPERTS["Pendulum-v1"], seeds=range(5))
    assert pend.mean() > -250
    rand = evaluate_policy("Pendulum-v1", random_policy(PENDULUM_SPACE), seeds=range(5))
    assert rand.mean() < -800


def test_random_actions_use_the_given_rng() -> None:
    a = [sample_action(PENDULUM_SPACE, np.random.default_rng(1)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    assert a[0].dtype == np.float32 and PENDULUM_SPACE.contains(a[0])
    always = epsilon_random(cartpole_expert, 1.0, CARTPOLE_SPACE)
    rng = np.random.default_rng(0)
    acts = [always(np.zeros(4), rng) for _ in range(200)]
    assert 70 < sum(acts) < 130
    never = epsilon_random(cartpole_expert, 0.0, CARTPOLE_SPACE)
    assert never(np.array([0.0, 0.0, 0.1, 0.0]), rng) == 1


def test_mlp_expert_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    params = dict(obs_mean=np.zeros(3), obs_std=np.ones(3), w0=rng.normal(size=(3, 64)), b0=np.zeros(64),
                  w1=rng.normal(size=(64, 64)) / 8, b1=np.zeros(64), w_out=rng.normal(size=(64, 2)),
                  b_out=np.array([0.0, 5.0]), log_std=np.log([0.1, 0.1]))
    np.savez(tmp_path / "e.npz", **params)
    det = MLPExpert.from_npz(tmp_path / "e.npz", action_low=[-1, -1], action_high=[1, 1])
    obs = np.array([0.5, -0.2, 0.1])
    h = np.tanh(np.tanh(obs @ params["w0"]) @ params["w1"]) @ params["w_out"] + params["b_out"]
    np.testing.assert_allclose(det(obs, rng), np.clip(h, -1, 1), rtol=1e-6)
    assert det(obs, rng)[1] == 1.0 and det(obs, rng).dtype == np.float32
    noisy = MLPExpert.from_npz(tmp_path / "e.npz", noise=1.0)
    x, y = noisy(obs, np.random.default_rng(3)), noisy(obs, np.random.default_rng(3))
    np.testing.assert_array_equal(x, y)
    assert 0 < np.abs(x - h).max() < 1.0


@pytest.mark.skipif(not HOPPER_NPZ.exists(), reason="shared Hopper expert not available")
def test_hopper_npz_expert() -> None:
    env = gym.make("Hopper-v5")
    expert = MLPExpert.from_npz(HOPPER_NPZ, action_low=env.action_space.low, action_high=env.action_space.high)
    assert evaluate_policy(env, expert, seeds=[100])[0] == pytest.approx(3725.6, abs=30)


def test_quickstart_is_created_once(minari_root: Path) -> None:
    ids = ensure_quickstart_datasets("CartPole-v1")
    assert ids == {"expert": "bicql/cartpole/expert-v0", "offline": "bicql/cartpole/mixed-v0"}
    files = [minari_root / i / "data" / "main_data.hdf5" for i in ids.values()]
    mtimes = [f.stat().st_mtime_ns for f in files]
    expert, mixed = load_transitions(ids["expert"]), load_transitions(ids["offline"])
    assert (expert.num_episodes, len(expert)) == (10, 5000)
    assert (mixed.num_episodes, len(mixed)) == (50, 12757)
    assert expert.ref_max_score == mixed.ref_max_score == 500.0
    assert expert.ref_min_score == mixed.ref_min_score == pytest.approx(27.8)
    # Early mixed episodes are near-expert, late ones near-random.
    returns = np.bincount(mixed.episode_ids, weights=mixed.rewards)
    assert returns[:5].mean() > 400 and returns[-5:].mean() < 60

    time.sleep(0.01)
    assert ensure_quickstart_datasets("CartPole-v1") == ids
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_quickstart_pendulum() -> None:
    ids = ensure_quickstart_datasets("Pendulum-v1")
    expert = load_transitions(ids["expert"])
    assert (expert.num_episodes, len(expert)) == (10, 2000)
    assert expert.ref_max_score > -250 and expert.ref_min_score < -900
    with pytest.raises(DatasetError, match="no built-in expert"):
        ensure_quickstart_datasets("Acrobot-v1")


def test_cli(capsys: pytest.CaptureFixture, minari_root: Path) -> None:
    args = ["--env", "CartPole-v1", "--dataset-id", "cli/cart-v0", "--episodes", "2", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert str(minari_root / "cli" / "cart-v0") in out
    assert "2 episodes, 1000 transitions, mean return 500.00" in out
    assert main(args + ["--policy", "random"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--policy", "random", "--epsilon", "0.5", "--overwrite"]) == 0
    assert "mean return 500.00" not in capsys.readouterr().out


def test_quickstart_concurrent_processes(minari_root: Path) -> None:
    """Two processes (like DDP ranks) racing to create the quickstart data both succeed."""
    code = ("from bicql_lightning.datasets import ensure_quickstart_datasets as e;"
            "print(e('CartPole-v1')['expert'])")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(minari_root)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(out.strip() == "bicql/cartpole/expert-v0" for out, _ in results)
    assert load_transitions("bicql/cartpole/mixed-v0").num_episodes == 50


def test_failed_overwrite_keeps_old_data(minari_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    collect_dataset("tst/safe-v0", "CartPole-v1", noisy_cartpole(), 2, seed=0, progress=False)
    before = load_transitions("tst/safe-v0")
    original = minari.create_dataset_from_buffers

    def crash_after_writing(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(minari, "create_dataset_from_buffers", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        collect_dataset("tst/safe-v0", "CartPole-v1", noisy_cartpole(), 1, seed=9, overwrite=True, progress=False)
    np.testing.assert_array_equal(load_transitions("tst/safe-v0").observations, before.observations)
    assert sorted(p.name for p in minari_root.iterdir()) == ["tst"]


def test_discrete_observations_and_env_objects() -> None:
    env = gym.make("FrozenLake-v1", is_slippery=False)
    collect_dataset("tst/lake-v0", env, random_policy(env.action_space), 3, seed=0, progress=False)
    tr = load_transitions("tst/lake-v0")
    assert tr.observations.shape == (len(tr),) and tr.observations.dtype == np.int64
    assert tr.actions.dtype == np.int64 and tr.observation_space == gym.spaces.Discrete(16)
    assert tr.episode_starts.sum() == 3 and tr.env_spec.kwargs["is_slippery"] is False
