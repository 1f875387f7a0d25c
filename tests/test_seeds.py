"""K seeds in one process (``bicql_lightning.seeds``): each replica of a batched fit ends
where its seed's own ``Trainer.fit`` ends, and what the batch cannot train is refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from bicql_lightning import BiCQLML, OfflineIRLDataModule, TargetNetworkUpdate
from bicql_lightning.seeds import SeedBatch, fit_seeds, prepare

TINY_MODEL = dict(hidden_sizes=[32, 32], reward_hidden_sizes=[32, 32], proposal_hidden_sizes=[32, 32],
                  proposal_fit_steps=20, num_action_samples=4, log_every_n_updates=5,
                  policy={"init_args": {"num_candidates": 8, "hidden_sizes": [16], "fit_steps": 20}})
UPDATES = 12
TAU = 0.1


def data(ids, seed):
    return OfflineIRLDataModule(*ids, batch_size=32, batches_per_epoch=UPDATES, val_size=64, seed=seed)


def single_fit(ids, root, seed, accelerator="cpu", **model_kwargs):
    L.seed_everything(seed, verbose=False)
    dm = data(ids, seed)
    model = BiCQLML(**{**TINY_MODEL, **model_kwargs})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=root,
                        accelerator=accelerator, devices=1, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[TargetNetworkUpdate(tau=TAU)], limit_val_batches=0)
    trainer.fit(model, dm)
    return model, dm


def replicas(ids, seeds, device="cpu", **model_kwargs):
    """Each replica built as its single run builds it: seeded, then its data, then the model."""
    models, dms = [], []
    for seed in seeds:
        L.seed_everything(seed, verbose=False)
        dm = data(ids, seed)
        models.append(BiCQLML(**{**TINY_MODEL, **model_kwargs}, spaces=dm.spaces).to(device))
        dms.append(dm)
    return models, dms


@pytest.mark.parametrize("env,kwargs", [("pendulum", {}), ("pendulum", {"q_updates": 2, "cql_data": "expert"}),
                                        ("cartpole", {})])
def test_each_replica_of_a_batched_fit_ends_where_its_seeds_own_fit_ends(tiny, tmp_path, env, kwargs):
    seeds = [3, 7]
    models, dms = replicas(tiny.ids(env), seeds, **kwargs)
    fit_seeds(models, dms, seeds, UPDATES, tau=TAU)
    for seed, model, dm in zip(seeds, models, dms):
        alone, alone_dm = single_fit(tiny.ids(env), tmp_path / str(seed), seed, **kwargs)
        assert model.updates == alone.updates == UPDATES
        # The same batches and the same proposal noise were drawn from the same streams...
        assert torch.equal(dm.sampling_generator.get_state(), alone_dm.sampling_generator.get_state())
        assert torch.equal(model._rng().get_state(), alone._rng().get_state())
        # ... so every parameter and buffer (Q, target, reward, proposal, refitted policy)
        # is the single run's, to float tolerance.
        a, b = alone.state_dict(), model.state_dict()
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    # The replicas did not train alike: different seeds, different networks.
    gap = (models[0].q_net.state_in.weight - models[1].q_net.state_in.weight).abs().max()
    assert gap > 1e-2


def test_the_replicas_train_apart_from_one_another(tiny):
    # A replica's result does not depend on which others share its batch.
    pair, pair_dms = replicas(tiny.ids("pendulum"), [3, 7])
    fit_seeds(pair, pair_dms, [3, 7], UPDATES, tau=TAU)
    one, one_dms = replicas(tiny.ids("pendulum"), [7])
    fit_seeds(one, one_dms, [7], UPDATES, tau=TAU)
    for name, value in one[0].state_dict().items():
        torch.testing.assert_close(pair[1].state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_the_batched_metrics_have_one_value_per_seed(tiny):
    models, dms = replicas(tiny.ids("pendulum"), [0, 1, 2])
    rows = []
    fit_seeds(models, dms, [0, 1, 2], 3, tau=TAU, callback=lambda update, m: rows.append((update, m)))
    assert [u for u, _ in rows] == [1, 2, 3]
    metrics = rows[-1][1]
    assert {"q/td_loss", "cql/gap", "reward/loss"} <= set(metrics)
    assert all(v.shape == (3,) for v in metrics.values())
    assert len(set(metrics["q/td_loss"].tolist())) == 3


@pytest.mark.parametrize("kwargs,match", [({"cql_gradient_samples": 1}, "cql_gradient_samples"),
                                          ({"capture_graph": True}, "capture_graph")])
def test_what_the_batch_cannot_train_is_refused_in_one_line(tiny, kwargs, match):
    models, dms = replicas(tiny.ids("pendulum"), [0, 1], **kwargs)
    with pytest.raises(ValueError, match=match):
        SeedBatch(models, dms)


def test_replicas_of_different_configurations_are_refused(tiny):
    a, dms = replicas(tiny.ids("pendulum"), [0])
    b, more = replicas(tiny.ids("pendulum"), [1], alpha=2.0)
    for model, dm, seed in zip(a + b, dms + more, [0, 1]):
        prepare(model, dm, seed)
    with pytest.raises(ValueError, match="alpha"):
        SeedBatch(a + b, dms + more)


def test_a_replica_saved_without_a_trainer_loads_as_its_own_checkpoint(tiny, tmp_path):
    from bicql_lightning import RewardNet
    from bicql_lightning.seeds import save_checkpoint

    models, dms = replicas(tiny.ids("pendulum"), [0, 1])
    fit_seeds(models, dms, [0, 1], 3, tau=TAU)
    path = tmp_path / "seed1.ckpt"
    save_checkpoint(models[1], str(path))
    loaded = BiCQLML.load_from_checkpoint(path)
    assert loaded.updates == 3 and loaded.termination == models[1].termination
    for name, value in models[1].state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    obs, act = dms[1].pairs("offline")
    reward = RewardNet.from_checkpoint(path)
    assert torch.equal(reward(obs[:16], act[:16]), models[1].reward_net(obs[:16], act[:16]))
    # The loaded module acts as the trained one did.
    assert torch.equal(torch.as_tensor(loaded.act(obs[:4].numpy())), torch.as_tensor(models[1].act(obs[:4].numpy())))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_each_replica_ends_where_its_seeds_own_gpu_fit_ends(tiny, tmp_path):
    # Data and both random streams on the GPU, as a GPU fit keeps them (data_on_device).
    seeds = [3, 7]
    models, dms = replicas(tiny.ids("pendulum"), seeds, device="cuda")
    fit_seeds(models, dms, seeds, UPDATES, tau=TAU)
    for seed, model in zip(seeds, models):
        alone, _ = single_fit(tiny.ids("pendulum"), tmp_path / str(seed), seed, accelerator="gpu")
        assert model._rng().device.type == "cuda"
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-3, atol=1e-4, msg=name)
