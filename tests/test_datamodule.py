"""OfflineIRLDataModule: what it serves, which transitions, its statistics and its sampler."""

from __future__ import annotations

import io
import time
import warnings

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

from bicql_lightning import DatasetError, OfflineIRLDataModule, load_transitions, space_spec
from bicql_lightning.datamodule import FIELDS

OBS_DIM = {"cartpole": 4, "pendulum": 3}


def make_dm(expert, offline, **kwargs) -> OfflineIRLDataModule:
    kwargs = {"batch_size": 16, "batches_per_epoch": 4, "data_on_device": False, **kwargs}
    return OfflineIRLDataModule(expert_dataset=expert, offline_dataset=offline, **kwargs)


def sample(dm: OfflineIRLDataModule, n: int) -> list[dict]:
    return [dm.sample_batch() for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(x[part][k], y[part][k]) for x, y in zip(a, b, strict=True)
               for part in ("offline", "expert") for k in FIELDS)


def rows_are_transitions_of(batch: dict, store) -> bool:
    """Every batch row equals one stored transition in all five fields at once."""
    match = None
    for k in FIELDS:
        stored, got = store.tensors[k], batch[k]
        eq = stored.reshape(len(stored), 1, -1) == got.reshape(1, len(got), -1)  # (N, B, D)
        match = eq.all(-1) if match is None else match & eq.all(-1)
    return bool(match.any(0).all())


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("env", ["cartpole", "pendulum"])
def test_batches_are_offline_and_expert_dicts_of_transition_tensors(tiny, env):
    expert, offline = tiny.ids(env)
    dm = make_dm(expert, offline, batch_size=24, expert_batch_size=10, batches_per_epoch=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(dm.train_dataloader()) == len(batches) == 3
    d = OBS_DIM[env]
    for batch in batches:
        assert set(batch) == {"offline", "expert"}
        for part, n in (("offline", 24), ("expert", 10)):
            b = batch[part]
            assert set(b) == {"obs", "action", "reward", "next_obs", "terminated"}
            assert b["obs"].shape == b["next_obs"].shape == (n, d)
            assert b["obs"].dtype == b["next_obs"].dtype == torch.float32
            if env == "cartpole":
                assert b["action"].shape == (n,) and b["action"].dtype == torch.int64
                assert set(b["action"].tolist()) <= {0, 1}
            else:
                assert b["action"].shape == (n, 1) and b["action"].dtype == torch.float32
                assert b["action"].abs().max() <= 2.0
            assert b["reward"].shape == b["terminated"].shape == (n,)
            assert b["reward"].dtype == b["terminated"].dtype == torch.float32
            assert set(b["terminated"].unique().tolist()) <= {0.0, 1.0}
        assert rows_are_transitions_of(batch["expert"], dm.expert_store)
        assert rows_are_transitions_of(batch["offline"], dm.offline_store)


def test_expert_batch_size_defaults_to_batch_size(tiny):
    dm = make_dm(*tiny.ids("cartpole"), batch_size=7)
    batch = dm.sample_batch()
    assert batch["offline"]["obs"].shape[0] == batch["expert"]["obs"].shape[0] == 7


@pytest.mark.parametrize("expert_batch_size", [None, 16, 8])
def test_with_d_equal_to_d_e_one_batch_serves_as_both_unless_sizes_differ(tiny, expert_batch_size):
    dm = make_dm(tiny.cartpole_expert, None, batch_size=16, expert_batch_size=expert_batch_size)
    dm.setup("fit")
    batch = dm.sample_batch()
    shared = expert_batch_size != 8
    assert dm.shared_batches == shared
    assert (batch["offline"] is batch["expert"]) == shared
    moved = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert (moved["offline"] is moved["expert"]) == shared
    assert make_dm(*tiny.ids("cartpole")).shared_batches is False  # D is another dataset


def test_the_store_holds_each_observation_once_sharing_the_loaded_arrays(tiny):
    dm = make_dm(tiny.pendulum_mixed, None)
    dm.setup("fit")
    store, loaded = dm.expert_store, dm.expert
    n, episodes = len(loaded), loaded.num_episodes
    assert store.obs.shape[0] == n + episodes  # T + 1 per episode, not 2T
    assert np.shares_memory(store.obs.numpy(), loaded.episode_observations)
    assert np.shares_memory(store.fields["action"].numpy(), loaded.actions)
    raw = loaded.episode_observations.nbytes + loaded.actions.nbytes + n * (4 + 1 + 1)  # + rewards, flags
    assert store.nbytes == raw - n + 4 * n  # without truncations, with int32 episode numbers
    batch = store.take(torch.arange(n))
    np.testing.assert_array_equal(batch["next_obs"].numpy(), loaded.next_observations)


# ----------------------------------------------------------------------------- which transitions
def test_expert_episodes_keeps_exactly_the_first_episodes(tiny):
    episodes = list(minari.load_dataset(tiny.cartpole_mixed).iterate_episodes())
    assert [len(ep.rewards) for ep in episodes] == [60, 60, 60, 25]  # unequal lengths: the cut is visible
    dm = make_dm(tiny.cartpole_mixed, None, expert_episodes=2)
    dm.setup("fit")
    t = dm.expert_store.tensors
    assert len(dm.expert_store) == 120
    np.testing.assert_array_equal(t["obs"].numpy(), np.concatenate([ep.observations[:-1] for ep in episodes[:2]]))
    np.testing.assert_array_equal(t["next_obs"].numpy(), np.concatenate([ep.observations[1:] for ep in episodes[:2]]))
    np.testing.assert_array_equal(t["action"].numpy(), np.concatenate([ep.actions for ep in episodes[:2]]))
    np.testing.assert_array_equal(t["reward"].numpy(), np.concatenate([ep.rewards for ep in episodes[:2]]))
    np.testing.assert_array_equal(t["terminated"].numpy(),
                                  np.concatenate([ep.terminations for ep in episodes[:2]]).astype(np.float32))
    assert t["terminated"].sum() == sum(int(ep.terminations.sum()) for ep in episodes[:2])


def test_without_offline_dataset_the_offline_data_is_the_expert_data(tiny):
    dm = make_dm(tiny.cartpole_expert, None, include_expert_in_offline=True)
    dm.setup("fit")
    assert len(dm.offline_store) == len(dm.expert_store) == 180  # not doubled
    for k in FIELDS:
        assert torch.equal(dm.offline_store.tensors[k], dm.expert_store.tensors[k])


@pytest.mark.parametrize("include", [True, False])
def test_include_expert_in_offline_appends_the_expert_transitions(tiny, include):
    dm = make_dm(tiny.cartpole_expert, tiny.cartpole_mixed, include_expert_in_offline=include)
    dm.setup("fit")
    assert len(dm.expert_store) == 180
    assert len(dm.offline_store) == (205 + 180 if include else 205)
    offline = load_transitions(tiny.cartpole_mixed)
    np.testing.assert_array_equal(dm.offline_store.tensors["obs"][:205].numpy(), offline.observations)
    if include:
        assert torch.equal(dm.offline_store.tensors["obs"][205:], dm.expert_store.tensors["obs"])
        assert torch.equal(dm.offline_store.tensors["action"][205:], dm.expert_store.tensors["action"])


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("include", [True, False])
def test_observation_statistics_are_numpys_mean_and_std_over_the_offline_data(tiny, include):
    dm = make_dm(tiny.pendulum_expert, tiny.pendulum_mixed, include_expert_in_offline=include)
    dm.setup("fit")
    obs = load_transitions(tiny.pendulum_mixed).observations.astype(np.float64)
    if include:
        obs = np.concatenate([obs, load_transitions(tiny.pendulum_expert).observations.astype(np.float64)])
    assert obs.shape == ((150 + 100) if include else 150, 3)
    assert dm.obs_mean.shape == dm.obs_std.shape == (3,)
    np.testing.assert_allclose(dm.obs_mean.numpy(), obs.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dm.obs_std.numpy(), obs.std(0), rtol=1e-6)


def test_unnormalised_observations_get_zero_mean_unit_std(tiny):
    dm = make_dm(*tiny.ids("pendulum"), normalize_observations=False)
    dm.setup("fit")
    assert torch.equal(dm.obs_mean, torch.zeros(3)) and torch.equal(dm.obs_std, torch.ones(3))


def test_a_constant_observation_feature_gets_std_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    rng = np.random.default_rng(0)
    buffers = []
    for k in range(2):
        obs = rng.uniform(-1, 1, (21, 3)).astype(np.float32)
        obs[:, 1] = 0.25  # the constant feature
        buffers.append(EpisodeBuffer(id=k, observations=obs, actions=rng.uniform(-2, 2, (20, 1)).astype(np.float32),
                                     rewards=[0.0] * 20, terminations=[False] * 20, truncations=[False] * 19 + [True]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers("tst/const-v0", buffers, env="Pendulum-v1", data_format="hdf5")
    dm = make_dm("tst/const-v0", None)
    dm.setup("fit")
    flat = np.concatenate([b.observations[:-1] for b in buffers]).astype(np.float64)
    assert dm.obs_std[1] == 1.0 and dm.obs_mean[1] == pytest.approx(0.25)
    np.testing.assert_allclose(dm.obs_std[[0, 2]].numpy(), flat[:, [0, 2]].std(0), rtol=1e-6)
    assert torch.isfinite((dm.offline_store.tensors["obs"] - dm.obs_mean) / dm.obs_std).all()


# ----------------------------------------------------------------------------- sampler
def test_same_seed_gives_the_same_batches_and_another_seed_others(tiny):
    ids = tiny.ids("cartpole")
    a, b, c = sample(make_dm(*ids, seed=3), 5), sample(make_dm(*ids, seed=3), 5), sample(make_dm(*ids, seed=4), 5)
    assert same_batches(a, b)
    assert not torch.equal(a[0]["offline"]["obs"], c[0]["offline"]["obs"])


def test_epochs_continue_the_index_stream_rather_than_repeat_it(tiny):
    dm = make_dm(*tiny.ids("cartpole"), seed=0, batches_per_epoch=3)
    dm.setup("fit")
    first, second = list(dm.train_dataloader()), list(dm.train_dataloader())
    assert not torch.equal(first[0]["offline"]["obs"], second[0]["offline"]["obs"])
    assert same_batches(first + second, sample(make_dm(*tiny.ids("cartpole"), seed=0), 6))


@pytest.mark.parametrize("restore", ["before_setup", "after_setup"])
def test_state_dict_restores_the_sampler(tiny, restore):
    ids = tiny.ids("pendulum")
    dm = make_dm(*ids, seed=0)
    dm.setup("fit")
    sample(dm, 3)
    buffer = io.BytesIO()
    torch.save(dm.state_dict(), buffer)  # the way it travels in a Lightning checkpoint
    following = sample(dm, 3)

    other = make_dm(*ids, seed=123)  # another seed: only the restored state can reproduce `following`
    if restore == "after_setup":
        other.setup("fit")
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=False))
    assert same_batches(sample(other, 3), following)
    assert torch.equal(other.obs_mean, dm.obs_mean) and torch.equal(other.obs_std, dm.obs_std)


# ----------------------------------------------------------------------------- errors
def test_datasets_of_different_environments_raise_dataset_error_naming_both(tiny):
    dm = make_dm(tiny.cartpole_expert, tiny.pendulum_mixed)
    with pytest.raises(DatasetError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert tiny.cartpole_expert in message and tiny.pendulum_mixed in message
    assert "different observation spaces" in message
    assert "(3,), float32" in message and "(4,), float32" in message  # both spaces shown


def test_unknown_dataset_id_fails_fast_with_its_id(tiny, monkeypatch):
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://unreachable.invalid")  # no network, whatever the machine
    dm = make_dm("nobody/missing-v0", None, download=True)
    start = time.perf_counter()
    with pytest.raises(DatasetError, match="nobody/missing-v0") as err:
        dm.setup("fit")
    assert time.perf_counter() - start < 10.0
    assert "bicql dataset" in str(err.value)  # and it says how to make one


def test_unknown_dataset_id_without_download_says_so(tiny):
    with pytest.raises(DatasetError, match=r"'nobody/missing-v0'.*download=False"):
        make_dm(tiny.cartpole_expert, "nobody/missing-v0", download=False).setup("fit")


# ----------------------------------------------------------------------------- spaces
def test_spaces_property_is_the_space_spec_of_the_data(tiny):
    cartpole = make_dm(*tiny.ids("cartpole"))
    pendulum = make_dm(*tiny.ids("pendulum"))
    # Read lazily: no setup needed, which is how the CLI sizes the model before fit.
    assert cartpole.spaces == {"obs_kind": "box", "obs_dim": 4, "action_kind": "discrete", "action_dim": 2,
                               "action_low": [], "action_high": []}
    assert pendulum.spaces == {"obs_kind": "box", "obs_dim": 3, "action_kind": "box", "action_dim": 1,
                               "action_low": [-2.0], "action_high": [2.0]}
    env = gym.make("Pendulum-v1")
    assert pendulum.spaces == space_spec(env.observation_space, env.action_space)


def test_subsampled_demonstrations_keep_every_kth_transition_whole_and_nothing_else(tiny):
    full = OfflineIRLDataModule(tiny.cartpole_expert, tiny.cartpole_mixed, seed=0)
    sub = OfflineIRLDataModule(tiny.cartpole_expert, tiny.cartpole_mixed, expert_subsample=20, seed=0)
    full.load(), sub.load()
    f, s = full.expert_store.tensors, sub.expert_store.tensors
    episodes = full.episodes("expert")
    step = torch.cat([torch.arange(int((episodes == k).sum())) for k in range(int(episodes.max()) + 1)])
    kept = (step % 20 == 0).nonzero().squeeze(1)
    assert len(sub.expert_store) == len(kept) == 9  # 3 episodes of 60 steps: t = 0, 20, 40
    for key in ("obs", "action", "reward", "next_obs", "terminated"):
        assert torch.equal(s[key], f[key][kept]), key
    assert sub.episodes("expert").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # D is the mixed episodes and the kept demonstration transitions only.
    n_mixed = len(full.offline_store) - len(full.expert_store)
    assert len(sub.offline_store) == n_mixed + 9
    d = sub.offline_store.tensors
    for key in ("obs", "action", "next_obs"):
        assert torch.equal(d[key][:n_mixed], full.offline_store.tensors[key][:n_mixed])
        assert torch.equal(d[key][n_mixed:], s[key])
    assert sub.episodes("offline")[n_mixed:].tolist() == [4, 4, 4, 5, 5, 5, 6, 6, 6]  # after the 4 mixed episodes
    batch = sub.sample_batch()
    assert batch["expert"]["obs"].shape[0] == 256
    with pytest.raises(ValueError, match="expert_subsample must be at least 1"):
        OfflineIRLDataModule(tiny.cartpole_expert, expert_subsample=0)
