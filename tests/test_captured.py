"""``BiCQLML(capture_graph=True)``: the whole iteration as one function (a CUDA graph on a GPU).

On the CPU there are no graphs and the captured iteration runs eagerly, so these tests
check everything the graph holds: that sampling inside the iteration draws the batches the
trainer's stream would have drawn, that the in-iteration Polyak step is the callback's,
and that the result is the ordinary run's, parameter for parameter. The replayed graph
itself is compared with eager training by the last test, on a GPU only.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from bicql_lightning import BiCQLML, OfflineIRLDataModule, TargetNetworkUpdate

TINY_MODEL = dict(hidden_sizes=[32, 32], reward_hidden_sizes=[32, 32], proposal_hidden_sizes=[32, 32],
                  proposal_fit_steps=20, num_action_samples=4, log_every_n_updates=5,
                  policy={"init_args": {"num_candidates": 8, "hidden_sizes": [16], "fit_steps": 20}})
UPDATES = 15


class Logged(L.Callback):
    """The metrics Lightning received at each logged update."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "train/updates" in trainer.callback_metrics and pl_module.updates % 5 == 0:
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()
                              if k.startswith(("q/", "cql/", "reward/"))})


def fit(ids, root, accelerator="cpu", seed=0, tau=0.1, **model_kwargs):
    L.seed_everything(seed, verbose=False)
    dm = OfflineIRLDataModule(*ids, batch_size=32, batches_per_epoch=UPDATES, val_size=64, seed=seed)
    model = BiCQLML(**{**TINY_MODEL, **model_kwargs})
    logged = Logged()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=root,
                        accelerator=accelerator, devices=1, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TargetNetworkUpdate(tau=tau), logged], limit_val_batches=0)
    trainer.fit(model, dm)
    return model, dm, logged.rows


@pytest.mark.parametrize("env", ["pendulum", "cartpole"])
def test_the_captured_iteration_trains_exactly_as_the_ordinary_loop_on_a_cpu(tiny, tmp_path, env):
    eager, eager_dm, eager_rows = fit(tiny.ids(env), tmp_path / "eager")
    captured, captured_dm, captured_rows = fit(tiny.ids(env), tmp_path / "captured", capture_graph=True)
    assert captured.draws_own_batches and not eager.draws_own_batches
    assert captured.updates == eager.updates == UPDATES
    # Same batches drawn (the stream yielded placeholders and the iteration sampled), same
    # proposal noise, same target steps: the same parameters, target network included.
    assert torch.equal(captured_dm.sampling_generator.get_state(), eager_dm.sampling_generator.get_state())
    assert torch.equal(captured._rng().get_state(), eager._rng().get_state())
    a, b = eager.state_dict(), captured.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    assert len(captured_rows) == len(eager_rows) == UPDATES // 5
    assert captured_rows == eager_rows


def test_the_target_network_moves_by_the_callbacks_tau_inside_the_iteration(tiny, tmp_path):
    # tau = 1 copies q_net into the target after every update; a smaller tau lags behind.
    copied, _, _ = fit(tiny.ids("pendulum"), tmp_path / "a", capture_graph=True, tau=1.0)
    lagged, _, _ = fit(tiny.ids("pendulum"), tmp_path / "b", capture_graph=True, tau=0.1)
    for t, q in zip(copied.target_q_net.parameters(), copied.q_net.parameters()):
        assert torch.equal(t, q)
    gaps = [(t - q).abs().max().item() for t, q in zip(lagged.target_q_net.parameters(), lagged.q_net.parameters())]
    assert max(gaps) > 1e-4


def test_the_data_module_draws_for_the_trainer_again_once_the_capturing_fit_is_over(tiny, tmp_path):
    _, dm, _ = fit(tiny.ids("pendulum"), tmp_path / "a", capture_graph=True)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path / "b",
                        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    model = BiCQLML(**TINY_MODEL)
    trainer.fit(model, dm)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"offline", "expert"} and batch["offline"]["obs"].shape[0] == 32
    assert model.updates == UPDATES and not model.draws_own_batches


def test_capture_graph_refuses_a_hard_target_copy_with_the_fix(tiny, tmp_path):
    dm = OfflineIRLDataModule(*tiny.ids("pendulum"), batch_size=32, batches_per_epoch=2, val_size=64)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TargetNetworkUpdate(hard_every_n_updates=10)])
    with pytest.raises(ValueError, match="use one TargetNetworkUpdate with tau"):
        trainer.fit(BiCQLML(**TINY_MODEL, capture_graph=True), dm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_the_replayed_cuda_graph_trains_as_eager_training_does_on_a_gpu(tiny, tmp_path):
    eager, _, _ = fit(tiny.ids("pendulum"), tmp_path / "eager", accelerator="gpu")
    captured, _, _ = fit(tiny.ids("pendulum"), tmp_path / "captured", accelerator="gpu", capture_graph=True)
    assert captured._captured.captured  # warm-up, then capture, then replays
    a, b = eager.state_dict(), captured.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
