"""Tabular MDPs, exact solvers and metrics (bicql_lightning.tabular, .tabular_metrics), and
one small BiCQL-ML fit scored against the exact answers."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest

from bicql_lightning.tabular import (GARNET_ID, GRIDWORLD_ID, Garnet, GridWorld, TabularEnv, policy_evaluation,
                                     soft_value_iteration, state_visitation, tabular_policy)
from bicql_lightning.tabular_metrics import (TabularTask, count_bc_policy, epic_distance, nll_gap,
                                             shaping_distance)

# Two states; every action moves to the other state. R[s, a].
SWAP_P = np.array([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
SWAP_R = np.array([[1.0, 0.0], [2.0, -1.0]])


def test_soft_value_iteration_matches_the_hand_solution():
    gamma, T = 0.9, 0.5
    # V0 = L0 + gamma V1, V1 = L1 + gamma V0 with L_s = T log sum_a exp(R[s, a] / T).
    L = T * np.log(np.exp(SWAP_R / T).sum(1))
    V0 = (L[0] + gamma * L[1]) / (1 - gamma**2)
    V1 = (L[1] + gamma * L[0]) / (1 - gamma**2)
    Q, V, pi = soft_value_iteration(SWAP_P, SWAP_R, gamma, T)
    np.testing.assert_allclose(V, [V0, V1], atol=1e-8)
    np.testing.assert_allclose(Q, SWAP_R + gamma * np.array([[V1, V1], [V0, V0]]), atol=1e-8)
    # The next state does not depend on the action, so pi* is the softmax of R / T.
    np.testing.assert_allclose(pi, np.exp(SWAP_R / T) / np.exp(SWAP_R / T).sum(1, keepdims=True), atol=1e-10)
    # Low temperature: the hard Bellman optimum.
    _, V_hard, _ = soft_value_iteration(SWAP_P, SWAP_R, gamma, 1e-3)
    np.testing.assert_allclose(V_hard, [(1 + gamma * 2) / (1 - gamma**2), (2 + gamma) / (1 - gamma**2)], atol=1e-2)


def test_policy_evaluation_and_visitation():
    gamma = 0.8
    pi = np.array([[0.25, 0.75], [0.5, 0.5]])
    r = (pi * SWAP_R).sum(1)  # [0.25, 0.5]
    J, V, d = policy_evaluation(SWAP_P, SWAP_R, pi, gamma, np.array([1.0, 0.0]))
    np.testing.assert_allclose(V, [(r[0] + gamma * r[1]) / (1 - gamma**2), (r[1] + gamma * r[0]) / (1 - gamma**2)])
    assert J == pytest.approx(V[0])
    np.testing.assert_allclose(d, [1 / (1 + gamma), gamma / (1 + gamma)])  # (1-g)(1 + g^2 + ...), ...
    np.testing.assert_allclose(state_visitation(SWAP_P, pi, np.array([1.0, 0.0]), 3), [2 / 3, 1 / 3])
    # Monte Carlo agrees with the exact return on a Garnet.
    env = Garnet(seed=3, S=8, A=3, b=2)
    pi = np.random.default_rng(0).dirichlet(np.ones(3), size=8)
    J, _, _ = policy_evaluation(env.P, env.R, pi, 0.5, env.mu0)
    policy, rng, total = tabular_policy(pi), np.random.default_rng(1), 0.0
    for k in range(2000):
        obs, _ = env.reset(seed=k)
        for t in range(30):
            obs, reward, *_ = env.step(policy(obs, rng))
            total += 0.5**t * reward
    assert total / 2000 == pytest.approx(J, abs=0.05)


def test_environments_are_registered_models_of_their_dynamics(tmp_path, monkeypatch):
    grid = gym.make(GRIDWORLD_ID)
    base = grid.unwrapped
    assert isinstance(base, GridWorld) and grid.spec.max_episode_steps == 50
    assert set(np.unique(base.P)) == {0.0, 1.0}  # slip 0: deterministic
    assert base.R[base.goal].tolist() == [20.0] * 4 and base.P[base.goal, :, base.home].tolist() == [1.0] * 4
    assert (base.mu0[base.walls] == 0).all()
    slippery = GridWorld(slip=0.2)
    np.testing.assert_allclose(slippery.P.sum(-1), 1.0)
    a, b = gym.make(GARNET_ID, seed=5, S=20, A=4, b=3).unwrapped, Garnet(seed=5, S=20, A=4, b=3)
    np.testing.assert_array_equal(a.P, b.P)
    assert ((a.P > 0).sum(-1) == 3).all() and not np.array_equal(a.R, Garnet(seed=6, S=20, A=4, b=3).R)
    # Sampled transitions follow P.
    env = Garnet(seed=1, S=5, A=2, b=3)
    env.reset(seed=0)
    env._state, counts = 0, np.zeros(5)
    for _ in range(4000):
        env._state = 0
        counts[env.step(1)[0]] += 1
    np.testing.assert_allclose(counts / 4000, env.P[0, 1], atol=0.03)
    # The project's dataset tools record them, and Minari rebuilds the same MDP.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    from bicql_lightning import collect_dataset

    made = gym.make(GARNET_ID, seed=2, S=12, A=3, b=2, max_episode_steps=10)
    ds = collect_dataset("tab/garnet-v0", made, tabular_policy(np.full((12, 3), 1 / 3)), 2, progress=False)
    assert ds.total_steps == 20
    rebuilt = ds.recover_environment().unwrapped
    np.testing.assert_array_equal(rebuilt.P, made.unwrapped.P)
    with pytest.raises(ValueError):
        TabularEnv(np.ones((2, 1, 2)), np.zeros((2, 1)), np.array([1.0, 0.0]))


def test_expert_actions_are_independent_of_the_dynamics_stream(tmp_path, monkeypatch):
    """collect_dataset seeds the policy with default_rng(seed), gymnasium seeds np_random from
    the same seed: the environments must not draw from that stream."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    from bicql_lightning import collect_dataset, load_transitions

    env = gym.make(GARNET_ID, seed=0, S=20, A=4, b=3)
    task = TabularTask.from_env(env, 0.9, 1.0)
    collect_dataset("tab/expert-v0", env, tabular_policy(task.pi_star), 60, progress=False)
    tr = load_transitions("tab/expert-v0")
    bc = count_bc_policy(tr.observations, tr.actions, 20, 4, prior=0.0)
    assert nll_gap(task.pi_star, bc, task.d_E, floor=1e-3) < 0.05


def test_shaping_distance_and_epic():
    task = TabularTask.from_env(gym.make(GARNET_ID, seed=4, S=25, A=4, b=3), 0.9, 1.0)
    rng = np.random.default_rng(0)
    f = rng.standard_normal(25) * 3
    shaped = 2.0 * (task.R + f[:, None] - 0.9 * task.P @ f) + 1.5
    w = task.weights
    assert shaping_distance(task.R, shaped, task.P, 0.9, w) < 1e-8
    assert shaping_distance(task.R, task.R, task.P, 0.9, w, fit_scale=False) < 1e-10
    # The soft advantage T log pi* is the shaping-normal form of the reward.
    assert shaping_distance(task.R, np.log(task.pi_star), task.P, 0.9, w) < 1e-8
    zero = shaping_distance(task.R, np.zeros_like(task.R), task.P, 0.9, w)
    noise = [shaping_distance(task.R, rng.standard_normal(task.R.shape), task.P, 0.9, w) for _ in range(5)]
    assert 0.5 < zero <= 1.0 and min(noise) > 0.5
    assert shaping_distance(task.R, -task.R, task.P, 0.9, w) == pytest.approx(zero)  # c >= 0
    # EPIC on the deterministic gridworld, rewards lifted to R(s, a, s').
    grid = TabularTask.from_env(gym.make(GRIDWORLD_ID), 0.9, 1.0)
    assert grid.deterministic
    cover = grid.weights[:, :, None] * grid.P
    phi = rng.standard_normal(64)
    R3 = np.broadcast_to(grid.R[:, :, None], grid.P.shape)
    transition_shaped = 3.0 * (R3 + 0.9 * phi[None, None, :] - phi[:, None, None]) - 2.0
    assert epic_distance(grid.R, transition_shaped, 0.9, grid.d_E, cover) < 1e-6
    assert epic_distance(grid.R, 0.5 * grid.R + 7, 0.9, grid.d_E, cover) < 1e-6
    assert epic_distance(grid.R, rng.standard_normal(grid.R.shape), 0.9, grid.d_E, cover) > 0.5
    assert np.isnan(epic_distance(grid.R, np.zeros_like(grid.R), 0.9, grid.d_E, cover))
    assert set(grid.reward_metrics(grid.R)) == {"return_ratio", "reward_dist", "reward_dist_all", "epic"}
    assert grid.reward_metrics(grid.R)["return_ratio"] == pytest.approx(1.0)


def test_small_fit_recovers_the_reward(tmp_path, monkeypatch):
    """BiCQL-ML through the user-facing module and data module on a 12-state Garnet: the
    learned reward beats the trivial rewards by a clear margin, and its soft-optimal policy
    is close to the expert's return."""
    import lightning.pytorch as pl

    from bicql_lightning import BiCQLML, OfflineIRLDataModule, TargetNetworkUpdate, collect_dataset
    from bicql_lightning.experts import random_policy

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    env = gym.make(GARNET_ID, seed=7, S=12, A=3, b=3, max_episode_steps=25)
    task = TabularTask.from_env(env, 0.9, 1.0)
    collect_dataset("tab/expert-v0", env, tabular_policy(task.pi_star), 80, progress=False)
    collect_dataset("tab/random-v0", env, random_policy(env.action_space), 40, seed=1000, progress=False)
    pl.seed_everything(0, verbose=False)
    dm = OfflineIRLDataModule(expert_dataset="tab/expert-v0", offline_dataset="tab/random-v0",
                              batch_size=128, batches_per_epoch=1500, val_size=32, download=False)
    model = BiCQLML(spaces=dm.spaces, hidden_sizes=[32, 32], reward_hidden_sizes=[32, 32], gamma=0.9,
                    temperature=1.0, alpha=3.0, cql_data="expert", q_lr=1e-3, reward_lr=1e-3,
                    log_every_n_updates=10**9)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                         callbacks=[TargetNetworkUpdate(tau=0.02)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm)
    metrics = task.evaluate_model(model)
    zero = task.reward_metrics(np.zeros((12, 3)))["reward_dist"]
    rand = task.reward_metrics(np.random.default_rng(0).standard_normal((12, 3)))["reward_dist"]
    assert metrics["reward_dist"] < 0.5 * min(zero, rand), (metrics, zero, rand)
    assert metrics["return_ratio"] > 0.8 and metrics["nll_gap"] < 0.05, metrics


def test_lipschitz_estimates_of_the_exact_loop():
    """Along an exact lower level (Q_k = Q*(r_k)) the soft advantage returns the reward:
    A(Q*(r)) = r, so L_Q * L_ML >= 1 on every pair and the learned and exact L_Q agree."""
    from bench.tabular import lipschitz_estimates, soft_advantage_table

    env = Garnet(seed=2, S=7, A=3, b=2)
    gamma, T = 0.8, 0.7
    rng = np.random.default_rng(0)
    rewards = [env.R + 0.3 * k * rng.standard_normal(env.R.shape) for k in range(5)]
    qs = [soft_value_iteration(env.P, r, gamma, T, tol=1e-12)[0] for r in rewards]
    for r, q in zip(rewards, qs):
        np.testing.assert_allclose(soft_advantage_table(q, env.P, gamma, T), r, atol=1e-8)
    est = lipschitz_estimates(rewards, qs, env.P, gamma, T)
    assert est["L_Q"] == pytest.approx(est["L_Q_learned"])
    assert 1.0 <= est["L_Q"] <= 1 / (1 - gamma) + 1e-9
    assert est["L_ML"] <= 1 + gamma + 1e-9
    assert est["L_prod"] >= 1.0 - 1e-9
    assert lipschitz_estimates(rewards, qs, env.P, gamma, T, reward_target="q")["L_ML"] == pytest.approx(1.0)
