"""The baselines: behaviour cloning and offline IQ-Learn.

Loss terms against hand-computed values, where gradients flow, tiny fits on the conftest
datasets (CartPole: Discrete actions, Pendulum: Box), checkpoints.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from bicql_lightning import (
    BehaviorCloning,
    BiCQLML,
    CheckpointError,
    IQLearn,
    OfflineIRLDataModule,
    RewardNet,
    RolloutEvaluation,
    TargetNetworkUpdate,
)
from bicql_lightning import bc, densities, iqlearn

DISCRETE = dict(obs_kind="box", obs_dim=4, action_kind="discrete", action_dim=3, action_low=[], action_high=[])
BOX = dict(obs_kind="box", obs_dim=5, action_kind="box", action_dim=2, action_low=[-2.0, -1.0], action_high=[2.0, 1.0])
TABULAR = dict(obs_kind="discrete", obs_dim=6, action_kind="discrete", action_dim=2, action_low=[], action_high=[])
QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)
UPDATES = 20
LOG_2PI_HALF = 0.5 * math.log(2 * math.pi)


def make_batch(spaces, batch_size=32, seed=0, at_bounds=False):
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
        if at_bounds:  # saturated actions, as clipped noisy experts produce
            action[::3, 0] = high[0]
            action[1::3, 1] = low[1]
    return {"obs": obs, "action": action, "reward": torch.randn(batch_size, generator=g),
            "next_obs": next_obs, "terminated": (torch.rand(batch_size, generator=g) < 0.2).float()}


def grads(module):
    return [p.grad for p in module.parameters()]


# ============================================================================ BC losses
def test_categorical_bc_loss_is_the_cross_entropy():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    action = torch.tensor([2, 0])
    loss, metrics = bc.categorical_bc_loss(logits, action)
    # log(e + e^2 + e^3) - 3 = 0.40760596; log 3 = 1.09861229
    assert loss.item() == pytest.approx((0.40760596 + 1.09861229) / 2, abs=1e-6)
    assert metrics["bc/accuracy"].item() == pytest.approx(1.0)  # argmax of a tie is the first action
    p = torch.softmax(logits[0], 0)
    assert metrics["bc/entropy"].item() == pytest.approx((-(p * p.log()).sum().item() + math.log(3)) / 2, abs=1e-6)


def test_clipped_gaussian_likelihood_is_a_density_inside_and_the_clipped_mass_on_the_faces():
    mean, log_std = torch.zeros(3), torch.zeros(3)
    unit = torch.tensor([0.5, 1.0, -1.0])
    got = densities.clipped_gaussian_log_prob(mean, log_std, unit)
    # inside: -0.5 * 0.25 - log sqrt(2 pi); faces: log Phi(-1) = log 0.15865525 each
    assert got.tolist() == pytest.approx([-0.125 - LOG_2PI_HALF, math.log(0.15865525), math.log(0.15865525)],
                                         abs=1e-6)
    # mu = 0.5, sigma = e^-1: upper face mass Phi((0.5 - 1) e) = Phi(-1.35914)
    got = densities.clipped_gaussian_log_prob(torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([1.0]))
    assert got.item() == pytest.approx(math.log(0.5 * math.erfc(1.35914091 / math.sqrt(2))), abs=1e-5)


def test_clipped_gaussian_likelihood_integrates_to_one_over_the_box_and_its_faces():
    mean, log_std = torch.tensor([0.7]), torch.tensor([-0.3])
    grid = torch.linspace(-1 + 1e-5, 1 - 1e-5, 200_001)
    inside = densities.clipped_gaussian_log_prob(mean.expand_as(grid), log_std.expand_as(grid), grid).exp()
    faces = densities.clipped_gaussian_log_prob(mean.expand(2), log_std.expand(2), torch.tensor([-1.0, 1.0])).exp()
    assert (torch.trapezoid(inside, grid) + faces.sum()).item() == pytest.approx(1.0, abs=1e-4)


def test_gaussian_bc_loss_converts_densities_to_environment_units_but_not_face_masses():
    mean, log_std = torch.zeros(1, 2), torch.zeros(1, 2)
    unit = torch.tensor([[0.5, 1.0]])
    log_half = torch.log(torch.tensor([2.0, 3.0]))
    loss, metrics = densities.gaussian_bc_loss(mean, log_std, unit, log_half, "clipped")
    expected = -((-0.125 - LOG_2PI_HALF - math.log(2.0)) + math.log(0.15865525))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["bc/at_bound"].item() == pytest.approx(0.5)
    assert metrics["bc/mse"].item() == pytest.approx(0.25 + 1.0)  # greedy clip(0) = 0
    # tanh: atanh(0.5) = 0.54930614, log N = -0.15086873 - log sqrt(2 pi), log(1 - 0.25) = -0.28768207
    loss, _ = densities.gaussian_bc_loss(mean[:, :1], log_std[:, :1], unit[:, :1], log_half[:1], "tanh")
    assert loss.item() == pytest.approx(-(-0.15086873 - LOG_2PI_HALF + 0.28768207 - math.log(2.0)), abs=1e-6)


def test_tanh_log_jacobian_is_stable_and_exact():
    u = torch.tensor([-3.0, 0.0, 0.4, 2.0], dtype=torch.float64)
    assert torch.allclose(densities.tanh_log_jacobian(u), torch.log(1 - torch.tanh(u) ** 2))
    assert torch.isfinite(densities.tanh_log_jacobian(torch.tensor([50.0, -50.0]))).all()


def test_tanh_policy_samples_carry_their_own_log_density():
    torch.manual_seed(0)
    policy = densities.GaussianPolicy(BOX, [16], "tanh")
    obs = torch.randn(6, 5)
    actions, log_prob = policy.rsample(obs, torch.randn(6, 1, 2) * 0.5)
    assert actions.shape == (6, 1, 2) and log_prob.shape == (6, 1)
    assert torch.allclose(log_prob[:, 0], policy.log_prob(obs, actions[:, 0]), atol=1e-4)
    low, high = torch.tensor(BOX["action_low"]), torch.tensor(BOX["action_high"])
    assert ((actions >= low) & (actions <= high)).all()


# ============================================================================ IQ-Learn losses
def test_chi2_phi():
    x = torch.tensor([0.0, 1.0, 2.0, -1.0])
    assert iqlearn.chi2_phi(x, 0.5).tolist() == pytest.approx([0.0, 0.5, 0.0, -1.5])
    assert iqlearn.chi2_phi(x, 2.0).tolist() == pytest.approx([0.0, 0.875, 1.5, -1.125])


def test_expert_loss_is_minus_phi_of_the_implicit_reward_averaged_over_critics():
    q = torch.tensor([[2.0, 1.0], [3.0, 0.0]])  # (E=2, B=2)
    next_value = torch.tensor([1.0, 5.0])
    terminated = torch.tensor([0.0, 1.0])
    loss, metrics = iqlearn.expert_loss(q, next_value, terminated, gamma=0.5, alpha=0.5)
    # r = Q - 0.5 (1 - d) V' = [[1.5, 1.0], [2.5, 0.0]]; phi(r) = r - r^2/2 = [[0.375, 0.5], [-0.625, 0]]
    assert loss.item() == pytest.approx(-(0.375 + 0.5 - 0.625 + 0.0) / 4)
    assert metrics["iq/expert_reward"].item() == pytest.approx(5.0 / 4)
    assert metrics["iq/chi2"].item() == pytest.approx((2.25 + 1.0 + 6.25) / 4 / 2)


def test_value_loss_is_the_telescoped_initial_value_term():
    value, next_value = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    loss, _ = iqlearn.value_loss(value, next_value, torch.tensor([0.0, 1.0]), gamma=0.9)
    assert loss.item() == pytest.approx(((1.0 - 2.7) + 2.0) / 2)


def test_soft_state_value_and_actor_loss():
    q, log_pi = torch.tensor([[2.0, 1.0]]), torch.tensor([[-1.0, 0.5]])
    assert iqlearn.soft_state_value(q, log_pi, 0.1).item() == pytest.approx(((2.0 + 0.1) + (1.0 - 0.05)) / 2)
    loss, metrics = iqlearn.actor_loss(q, log_pi, 0.1)
    assert loss.item() == pytest.approx(((-0.1 - 2.0) + (0.05 - 1.0)) / 2)
    assert metrics["actor/entropy"].item() == pytest.approx(0.25)


def test_discrete_critic_objective_is_the_offline_chi2_objective_with_exact_soft_values():
    torch.manual_seed(0)
    model = IQLearn(spaces=DISCRETE, hidden_sizes=[8], gamma=0.9, temperature=0.5, chi2_alpha=0.25)
    expert = make_batch(DISCRETE, batch_size=6)
    loss, _ = model.critic_objective(expert)
    q = model.q_net(model.encoder(expert["obs"]))[0]
    q_next = model.q_net(model.encoder(expert["next_obs"]))[0]
    v = 0.5 * torch.logsumexp(q / 0.5, 1)
    v_next = 0.5 * torch.logsumexp(q_next / 0.5, 1)
    r = q.gather(1, expert["action"].view(-1, 1)).squeeze(1) - 0.9 * (1 - expert["terminated"]) * v_next
    expected = -(r - r.pow(2) / (4 * 0.25)).mean() + (v - 0.9 * (1 - expert["terminated"]) * v_next).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_discrete_reward_is_the_inverse_soft_bellman_operator_of_q():
    torch.manual_seed(0)
    model = IQLearn(spaces=DISCRETE, hidden_sizes=[8], gamma=0.9, temperature=0.5, twin_critics=True)
    b = make_batch(DISCRETE, batch_size=5)
    q = model.q_net(model.encoder(b["obs"])).min(0).values
    q_next = model.q_net(model.encoder(b["next_obs"])).min(0).values
    expected = (q.gather(1, b["action"].view(-1, 1)).squeeze(1)
                - 0.9 * (1 - b["terminated"]) * 0.5 * torch.logsumexp(q_next / 0.5, 1))
    got = model.reward(b["obs"].numpy(), b["action"].numpy(), b["next_obs"].numpy(), b["terminated"].numpy())
    assert torch.allclose(got, expected.detach(), atol=1e-5)
    assert model.predict_reward(b["obs"].numpy(), b["action"].numpy(), b["next_obs"].numpy()).shape == (5,)


# ============================================================================ gradients
@pytest.mark.parametrize("spaces", [DISCRETE, BOX, TABULAR], ids=["discrete", "box", "tabular"])
def test_bc_objective_trains_the_policy_with_finite_gradients(spaces):
    torch.manual_seed(0)
    model = BehaviorCloning(spaces=spaces, hidden_sizes=[16])
    loss, metrics = model.bc_objective(make_batch(spaces, at_bounds=True))
    loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in grads(model.policy))
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("use_target", [False, True], ids=["online_next_value", "target_next_value"])
@pytest.mark.parametrize("spaces", [DISCRETE, BOX, TABULAR], ids=["discrete", "box", "tabular"])
def test_iq_critic_update_gradients_reach_only_the_critic(spaces, use_target):
    torch.manual_seed(0)
    model = IQLearn(spaces=spaces, hidden_sizes=[16], actor_hidden_sizes=[16], use_target=use_target,
                    value_data="both", twin_critics=True, num_value_samples=3)
    loss, metrics = model.critic_objective(make_batch(spaces), make_batch(spaces, seed=1))
    loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in grads(model.q_net))
    assert all(g is None for g in grads(model.target_q_net))
    if model.actor is not None:
        assert all(g is None for g in grads(model.actor))
    assert all(torch.isfinite(v) for v in metrics.values())


def test_iq_actor_update_gradients_reach_only_the_actor():
    torch.manual_seed(0)
    model = IQLearn(spaces=BOX, hidden_sizes=[16], actor_hidden_sizes=[16], twin_critics=True)
    loss, metrics = model.actor_objective(make_batch(BOX)["obs"])
    loss.backward()
    assert all(g is not None and torch.isfinite(g).all() for g in grads(model.actor))
    assert all(g is None for g in grads(model.q_net)) and all(g is None for g in grads(model.target_q_net))
    assert all(p.requires_grad for p in model.q_net.parameters())  # restored after the actor step
    assert torch.isfinite(loss) and set(metrics) == {"actor/loss", "actor/entropy", "actor/q"}


@pytest.mark.parametrize("model_cls", [BehaviorCloning, IQLearn])
@pytest.mark.parametrize("spaces", [DISCRETE, BOX], ids=["discrete", "box"])
def test_act_returns_valid_actions_for_single_and_batched_observations(model_cls, spaces):
    torch.manual_seed(0)
    model = model_cls(spaces=spaces, hidden_sizes=[16])
    obs = make_batch(spaces, batch_size=7)["obs"].numpy()
    batched, single = model.act(obs), model.act(obs[0], deterministic=False)
    if spaces["action_kind"] == "discrete":
        assert batched.shape == (7,) and np.all((batched >= 0) & (batched < 3)) and np.ndim(single) == 0
    else:
        assert batched.shape == (7, 2) and single.shape == (2,)
        assert np.all(np.abs(batched) <= np.array(spaces["action_high"]))
    assert np.array_equal(model.act(obs), batched)  # greedy acting is a function of the observation


def test_invalid_hyperparameters_are_refused_with_their_name():
    with pytest.raises(ValueError, match="train_on"):
        BehaviorCloning(spaces=DISCRETE, train_on="everything")
    with pytest.raises(ValueError, match="distribution"):
        BehaviorCloning(spaces=BOX, distribution="beta")
    with pytest.raises(ValueError, match="value_data"):
        IQLearn(spaces=DISCRETE, value_data="policy")
    with pytest.raises(ValueError, match="chi2_alpha"):
        IQLearn(spaces=DISCRETE, chi2_alpha=0.0)


# ============================================================================ tiny fits
def fit(model, ids, root, callbacks=(), seed=0):
    L.seed_everything(seed, verbose=False)
    dm = OfflineIRLDataModule(*ids, batch_size=32, batches_per_epoch=UPDATES, val_size=64, seed=seed)
    trainer = L.Trainer(max_epochs=1, logger=False, log_every_n_steps=5, enable_checkpointing=False,
                        default_root_dir=root, callbacks=list(callbacks), **QUIET)
    trainer.fit(model, dm)
    return trainer


SMALL = {"bc": lambda: BehaviorCloning(hidden_sizes=[32, 32], updates_per_sec_every=5),
         "bc_offline": lambda: BehaviorCloning(hidden_sizes=[32, 32], train_on="offline"),
         "iq": lambda: IQLearn(hidden_sizes=[32, 32], actor_hidden_sizes=[32, 32], updates_per_sec_every=5),
         "iq_offline_values": lambda: IQLearn(hidden_sizes=[32, 32], actor_hidden_sizes=[32, 32],
                                              value_data="both", actor_data="both", twin_critics=True)}
LOGGED = {"bc": {"bc/nll"}, "iq": {"iq/loss", "iq/expert_loss", "iq/value_loss", "iq/chi2"}}


@pytest.fixture(scope="module")
def fitted(tiny_data, tmp_path_factory):
    """Each baseline fitted once per environment (20 updates, rollout evaluation at the end)."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tiny_data.root))
        for env in ("cartpole", "pendulum"):
            for name in ("bc", "iq"):
                root = tmp_path_factory.mktemp(f"{name}_{env}")
                rollout = RolloutEvaluation(every_n_updates=0, episodes=2)
                model = SMALL[name]()
                trainer = fit(model, tiny_data.ids(env), root, callbacks=[rollout])
                out[name, env] = (model, trainer, rollout, root)
    return out


@pytest.mark.parametrize("env", ["cartpole", "pendulum"])
@pytest.mark.parametrize("name", ["bc", "iq"])
def test_tiny_fit_counts_updates_logs_finite_metrics_and_evaluates(fitted, name, env):
    model, trainer, rollout, _ = fitted[name, env]
    assert model.updates == UPDATES
    assert model.updates_per_sec > 0
    metrics = trainer.callback_metrics
    expected = LOGGED[name] | {"train/updates", "train/updates_per_sec"}
    if name == "iq" and env == "pendulum":
        expected |= {"actor/loss", "actor/entropy"}
    assert expected <= set(metrics), set(metrics)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
    assert metrics["train/updates"].item() == UPDATES
    assert "val/expert_nll" in metrics or "val/expert_action_mse" in metrics
    assert rollout.last["updates"] == UPDATES and np.isfinite(rollout.last["return"])
    assert bool(model.encoder.initialized)


def test_iqlearn_adds_a_target_update_only_when_it_reads_a_target(fitted):
    box, _, _, _ = fitted["iq", "pendulum"]
    assert box.use_target and any(isinstance(cb, TargetNetworkUpdate) for cb in fitted["iq", "pendulum"][1].callbacks)
    # The target moved towards the critic during the 20 updates.
    assert any(not torch.equal(t, p) for t, p in zip(box.target_q_net.parameters(), box.q_net.parameters()))
    discrete, trainer, _, _ = fitted["iq", "cartpole"]
    assert not discrete.use_target and not any(isinstance(cb, TargetNetworkUpdate) for cb in trainer.callbacks)


@pytest.mark.parametrize("env", ["cartpole", "pendulum"])
def test_variants_train_on_the_offline_data(tiny, tmp_path, env):
    for name in ("bc_offline", "iq_offline_values"):
        model = SMALL[name]()
        fit(model, tiny.ids(env), tmp_path / name)
        assert model.updates == UPDATES
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bc_trains_unchanged_under_a_configured_target_network_update(tiny, tmp_path):
    # BiCQL-ML configs list a TargetNetworkUpdate; with BC it must be a no-op, not an error.
    torch.manual_seed(0)
    with_cb = BehaviorCloning(hidden_sizes=[8])
    fit(with_cb, tiny.ids("cartpole"), tmp_path / "a", callbacks=[TargetNetworkUpdate()])
    torch.manual_seed(0)
    without = BehaviorCloning(hidden_sizes=[8])
    fit(without, tiny.ids("cartpole"), tmp_path / "b")
    assert with_cb.updates == without.updates == UPDATES
    for p, q in zip(with_cb.parameters(), without.parameters()):
        assert torch.equal(p, q)


# ============================================================================ checkpoints
@pytest.mark.parametrize("env", ["cartpole", "pendulum"])
@pytest.mark.parametrize("name", ["bc", "iq"])
def test_checkpoint_reload_gives_identical_actions_rewards_and_counters(fitted, name, env, tmp_path):
    model, trainer, _, _ = fitted[name, env]
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    cls = BehaviorCloning if name == "bc" else IQLearn
    loaded = cls.load_from_checkpoint(path)
    assert loaded.updates == model.updates and loaded.spaces == model.spaces
    batch = trainer.datamodule.sample_batch()["offline"]
    obs = batch["obs"].numpy()
    np.testing.assert_array_equal(loaded.act(obs), model.act(obs))
    if name == "iq":
        args = (batch["obs"], batch["action"], batch["next_obs"], batch["terminated"])
        assert torch.equal(loaded.reward(*args), model.reward(*args))


@pytest.fixture(scope="module")
def checkpoints(fitted, tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline_ckpts")
    for name in ("bc", "iq"):
        fitted[name, "cartpole"][1].save_checkpoint(root / f"{name}.ckpt")
    return root


@pytest.mark.parametrize(("loader", "file", "found"), [
    (BehaviorCloning.load_from_checkpoint, "iq.ckpt", "IQLearn"),
    (IQLearn.load_from_checkpoint, "bc.ckpt", "BehaviorCloning"),
    (BiCQLML.load_from_checkpoint, "bc.ckpt", "BehaviorCloning"),
    (RewardNet.from_checkpoint, "iq.ckpt", "IQLearn"),
    (RewardNet.from_checkpoint, "bc.ckpt", "BehaviorCloning"),
])
def test_loading_another_models_checkpoint_raises_checkpoint_error(checkpoints, loader, file, found):
    with pytest.raises(CheckpointError, match=f"holds a {found} model"):
        loader(checkpoints / file)


def test_missing_checkpoint_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        IQLearn.load_from_checkpoint(tmp_path / "missing.ckpt")
