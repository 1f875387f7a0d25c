"""The paper's open questions as experimental options (bench.variants.BiCQLMLVariant):
adaptive conservatism (cql_target_gap), spectral-norm projection of the Q and reward
networks, and the reward-target ablation."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from bench import variants as module_lib
from bench.variants import BiCQLMLVariant
from bicql_lightning import OfflineIRLDataModule, losses
from bicql_lightning.networks import EnsembleLinear, clip_spectral_norm_
from test_module import BOX, TABULAR, make_batch

TINY = dict(hidden_sizes=[16, 16], reward_hidden_sizes=[16, 16], proposal_hidden_sizes=[16, 16],
            proposal_fit_steps=5, num_action_samples=4, log_every_n_updates=1,
            policy={"init_args": {"num_candidates": 8, "hidden_sizes": [16], "fit_steps": 5}})
QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
             limit_val_batches=0, num_sanity_val_steps=0, max_epochs=1)


def test_dual_loss_raises_alpha_while_the_gap_exceeds_its_target():
    for gap, direction in ((2.0, 1.0), (0.5, -1.0)):
        log_alpha = torch.tensor(0.3, requires_grad=True)
        gap_t = torch.tensor(gap, requires_grad=True)
        loss, metrics = losses.cql_alpha_dual_loss(log_alpha, gap_t, target_gap=1.0)
        loss.backward()
        assert log_alpha.grad.item() == pytest.approx(1.0 - gap)  # d/dlog_alpha of log_alpha (tau - gap)
        assert gap_t.grad is None  # the gap is a constant of the dual step
        assert -direction * log_alpha.grad.item() > 0  # a descent step moves log alpha in `direction`
        assert metrics["cql/alpha"].item() == pytest.approx(math.exp(0.3))


def test_cql_penalty_takes_no_gradient_through_a_tensor_alpha():
    value = torch.tensor([[3.0, 1.0]], requires_grad=True)
    alpha = torch.tensor(0.5, requires_grad=True)
    loss, _ = losses.cql_penalty(value, torch.zeros(1, 2), alpha)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)
    assert alpha.grad is None


def test_spectral_projection_caps_each_member_and_leaves_small_layers_alone():
    torch.manual_seed(0)
    layer = EnsembleLinear(3, 6, 5)
    with torch.no_grad():
        layer.weight[0] *= 10.0  # above 1
        layer.weight[1] *= 0.01  # inside the ball: untouched
    before = layer.weight.detach().clone()
    clip_spectral_norm_([[layer.weight]], in_dim=-2)
    sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
    assert sigma[0].item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(layer.weight[1], before[1])
    assert sigma[2].item() <= 1.0 + 1e-5
    # A layer split along its input axis is projected as one matrix.
    a, b = torch.randn(2, 4, 7) * 5, torch.randn(2, 3, 7) * 5
    clip_spectral_norm_([[a, b]], in_dim=-2)
    assert torch.linalg.matrix_norm(torch.cat([a, b], 1), ord=2).max().item() == pytest.approx(1.0, rel=1e-5)


def test_defaults_add_no_state_and_the_options_are_validated():
    model = BiCQLMLVariant(spaces=TABULAR, **{k: v for k, v in TINY.items() if "proposal" not in k})
    assert "log_alpha" not in model.state_dict()
    assert model.cql_alpha() == model.hparams.alpha
    with pytest.raises(ValueError, match="reward_target"):
        BiCQLMLVariant(spaces=TABULAR, reward_target="advantage")
    with pytest.raises(ValueError, match="cql_target_gap"):
        BiCQLMLVariant(spaces=TABULAR, alpha=0.0, cql_target_gap=1.0)


@pytest.mark.parametrize("spaces", [TABULAR, BOX], ids=["tabular", "box"])
def test_q_reward_target_regresses_onto_min_twin_q(spaces):
    torch.manual_seed(0)
    model = BiCQLMLVariant(spaces=spaces, reward_target="q", **TINY)
    pairs = make_batch(spaces)
    _, metrics = model.reward_objective(pairs)
    with torch.no_grad():
        q = model._min_q(pairs)
    assert metrics["reward/target_mean"].item() == pytest.approx(q.mean().item(), abs=1e-6)


def test_dual_step_averages_the_gap_over_ranks(monkeypatch):
    """Under DDP every rank steps log alpha with the global gap (ranks stay identical)."""
    model = BiCQLMLVariant(spaces=TABULAR, alpha=1.0, cql_target_gap=1.0, cql_alpha_lr=0.1)
    monkeypatch.setattr(model, "_world", lambda: (2, 0))
    reduced = []

    def fake_all_reduce_mean_(tensors, world_size):
        reduced.append(world_size)
        tensors[0].fill_(1.5)  # the other rank's gap 2.0, this rank's 1.0

    monkeypatch.setattr(module_lib, "all_reduce_mean_", fake_all_reduce_mean_)
    monkeypatch.setattr(module_lib, "is_distributed", lambda world_size: world_size > 1)
    model.after_q_updates({"cql/gap": torch.tensor(1.0)})
    assert reduced == [2]
    assert model.log_alpha.item() == pytest.approx(0.1 * 0.5)  # lr (gap - tau) with the global gap


class Record(Callback):
    def __init__(self):
        self.alphas, self.logged = [], {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.alphas.append(pl_module.log_alpha.item())
        self.logged = dict(trainer.callback_metrics)


def test_adaptive_alpha_trains_logs_and_is_checkpointed(tiny, tmp_path):
    dm = OfflineIRLDataModule(tiny.cartpole_expert, tiny.cartpole_mixed, batch_size=32, batches_per_epoch=6,
                              val_size=16, seed=0)
    # A target gap below any reachable one: alpha rises at every step.
    model = BiCQLMLVariant(cql_target_gap=-1.0, cql_alpha_lr=0.05, alpha=1.0, **TINY)
    record = Record()
    trainer = L.Trainer(**QUIET, logger=False, default_root_dir=tmp_path, callbacks=[record])
    trainer.fit(model, dm)
    assert np.all(np.diff(record.alphas) > 0)
    assert record.logged["cql/alpha"].item() == pytest.approx(math.exp(record.alphas[-2]), rel=1e-5)
    path = tmp_path / "adaptive.ckpt"
    trainer.save_checkpoint(path)
    restored = BiCQLMLVariant.load_from_checkpoint(path)
    assert restored.log_alpha.item() == model.log_alpha.item() == pytest.approx(record.alphas[-1])


@pytest.mark.parametrize("env", ["cartpole", "pendulum"])
def test_spectral_norm_keeps_hidden_layers_inside_the_unit_ball_while_training(tiny, env):
    dm = OfflineIRLDataModule(*tiny.ids(env), batch_size=32, batches_per_epoch=5, val_size=16, seed=0)
    model = BiCQLMLVariant(spectral_norm=True, reward_spectral_norm=True, q_lr=0.05, reward_lr=0.05, **TINY)
    L.Trainer(**QUIET, logger=False, enable_checkpointing=False).fit(model, dm)
    for net in (model.q_net, model.target_q_net):
        for group in net.hidden_weight_groups():
            assert torch.linalg.matrix_norm(torch.cat(group, -2), ord=2).max().item() <= 1.0 + 1e-4
    linears = [m for m in model.reward_net.net if isinstance(m, torch.nn.Linear)]
    for layer in linears[:-1]:
        assert torch.linalg.matrix_norm(layer.weight, ord=2).item() <= 1.0 + 1e-4
    # The heads are free: large learning rates take them past 1.
    assert torch.linalg.matrix_norm(linears[-1].weight, ord=2).item() > 0
