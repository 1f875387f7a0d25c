"""Distributed training is the same algorithm: DDP over W processes with a global batch B
trains the same networks as one process with batch B.

The two-process runs go through the real command line (``bicql fit`` with
``trainer.strategy: ddp``, ``accelerator: cpu``, ``devices: 2``, gloo), in their own process
group so a hang is killed with everything it started; the one-process reference runs the
same command in this process. A callback (``DumpState``, given by class path) saves what
each rank holds at the end of training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from bicql_lightning import BiCQLML, OfflineIRLDataModule
from bicql_lightning.cli import main as cli_main
from bicql_lightning.datamodule import TransitionStore, shard_size

TESTS = Path(__file__).resolve().parent
UPDATES = 6
ATOL = 1e-5  # float32, two summation orders


class DumpState(Callback):
    """Saves, per rank, the weights at the start and end of training, the optimizer
    states, the first batch it trained on, the logged metrics and the last rollout result."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.first_batch = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first_batch is None:
            self.first_batch = {part: {k: v.clone() for k, v in rows.items()} for part, rows in batch.items()}

    def on_train_end(self, trainer, pl_module):
        from bicql_lightning import RolloutEvaluation

        rollout = next(cb for cb in trainer.callbacks if isinstance(cb, RolloutEvaluation))
        torch.save({
            "world_size": trainer.world_size,
            "rank": trainer.global_rank,
            "updates": pl_module.updates,
            "global_step": trainer.global_step,
            "initial": self.initial,
            "final": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "optimizers": [opt.state_dict() for opt in trainer.optimizers],
            "first_batch": self.first_batch,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "rollout": rollout.last,
        }, os.path.join(self.path, f"rank{trainer.global_rank}-of-{trainer.world_size}.pt"))


def config(env: str, ids: tuple[str, str], out: Path, devices: int) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
            "max_epochs": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "log_every_n_steps": 3, "default_root_dir": str(out),
            "callbacks": [
                {"class_path": "bicql_lightning.TargetNetworkUpdate", "init_args": {"tau": 0.1}},
                # Evaluates on rank 0 and broadcasts, mid-training and at the end: must not deadlock.
                {"class_path": "bicql_lightning.RolloutEvaluation", "init_args": {"every_n_updates": 4, "episodes": 1}},
                {"class_path": "test_distributed.DumpState", "init_args": {"path": str(out)}},
            ],
        },
        "model": {"hidden_sizes": [32, 32], "reward_hidden_sizes": [32, 32], "proposal_hidden_sizes": [32, 32],
                  "proposal_fit_steps": 20, "num_action_samples": 4, "policy": {"init_args": {"num_candidates": 8, "hidden_sizes": [16], "fit_steps": 20}}, "cql_data": "both",
                  "q_updates": 2, "reward_updates": 1, "q_lr": 1e-3, "reward_lr": 1e-3,
                  # Box runs anchor the reward's level: its mean gap is the global batch's.
                  "reward_level": "anchored" if env == "pendulum" else "free"},
        "data": {"expert_dataset": ids[0], "offline_dataset": ids[1], "batch_size": 32, "expert_batch_size": 16,
                 "batches_per_epoch": UPDATES, "val_size": 64, "seed": 0},
    }


def start_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    script = Path(sys.executable).with_name("bicql")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "bicql_lightning.cli"]
    return subprocess.Popen(cmd + args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for a run; on timeout kill its whole process group (the DDP launcher's children too)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run timed out after {timeout} s (a hang?):\n{out[-3000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """For CartPole (Discrete) and Pendulum (Box): a two-process DDP run started in the
    background, and the one-process reference run here meanwhile."""
    root = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tiny_data.root), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = {}
    for env_name in ("cartpole", "pendulum"):
        out = root / f"{env_name}-2"
        out.mkdir()
        (out / "config.yaml").write_text(yaml.safe_dump(config(env_name, tiny_data.ids(env_name), out, 2)))
        procs[env_name] = start_cli(["fit", "--config", str(out / "config.yaml")], env, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tiny_data.root))
        mp.setattr(sys, "argv", ["bicql"])  # the command line is the args below, not pytest's
        for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything sets these: undo on exit
            mp.setenv(var, os.environ.get(var, "0"))
        for env_name in ("cartpole", "pendulum"):
            out = root / f"{env_name}-1"
            out.mkdir()
            (out / "config.yaml").write_text(yaml.safe_dump(config(env_name, tiny_data.ids(env_name), out, 1)))
            cli_main(["fit", "--config", str(out / "config.yaml")])
    results = {}
    for env_name, proc in procs.items():
        code, log = finish(proc, timeout=240)
        assert code == 0, log[-4000:]
        load = lambda world, rank, e=env_name: torch.load(root / f"{e}-{world}" / f"rank{rank}-of-{world}.pt",  # noqa: E731
                                                          weights_only=False)
        results[env_name] = {"one": load(1, 0), "two": [load(2, 0), load(2, 1)], "log": log}
    return results


ENVS = ["cartpole", "pendulum"]


@pytest.mark.parametrize("env", ENVS)
def test_two_processes_train_the_same_networks_as_one(runs, env):
    one, (rank0, rank1) = runs[env]["one"], runs[env]["two"]
    assert (one["world_size"], rank0["world_size"], rank1["rank"]) == (1, 2, 1)
    assert one["updates"] == rank0["updates"] == rank1["updates"] == UPDATES
    assert one["global_step"] == rank0["global_step"] == 3 * UPDATES  # K_Q + K_R optimizer steps per update
    # The same initial weights (DDP broadcasts rank 0's) ...
    for name, value in one["initial"].items():
        assert torch.equal(rank0["initial"][name], value), name
    # ... and after 6 updates (18 Adam steps) the same weights, to float tolerance.
    worst = {}
    for name, value in one["final"].items():
        worst[name] = (rank0["final"][name].double() - value.double()).abs().max().item()
    assert max(worst.values()) < ATOL, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    # The comparison can fail: every trained network moved much further than the tolerance.
    for prefix in ("q_net.", "reward_net.net.", "target_q_net."):
        moved = max((one["final"][k] - one["initial"][k]).abs().max().item() for k in one["final"]
                    if k.startswith(prefix))
        assert moved > 1e-3, prefix
    if env == "pendulum":
        assert any(k.startswith("proposal.") for k in worst)  # the fitted Box proposal is compared too


@pytest.mark.parametrize("env", ENVS)
def test_ranks_hold_identical_networks_targets_and_optimizer_states(runs, env):
    rank0, rank1 = runs[env]["two"]
    for name, value in rank0["final"].items():
        assert torch.equal(rank1["final"][name], value), name  # bit for bit, target network included
    assert any(k.startswith("target_q_net.") for k in rank0["final"])
    for opt0, opt1 in zip(rank0["optimizers"], rank1["optimizers"], strict=True):
        for state0, state1 in zip(opt0["state"].values(), opt1["state"].values(), strict=True):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(state0[key], state1[key]), key


@pytest.mark.parametrize("env", ENVS)
def test_each_rank_trains_on_its_contiguous_half_of_the_global_batch(runs, env):
    one, (rank0, rank1) = runs[env]["one"], runs[env]["two"]
    for part, size in (("offline", 32), ("expert", 16)):
        for key, whole in one["first_batch"][part].items():
            assert whole.shape[0] == size
            assert rank0["first_batch"][part][key].shape[0] == rank1["first_batch"][part][key].shape[0] == size // 2
            assert torch.equal(torch.cat([rank0["first_batch"][part][key], rank1["first_batch"][part][key]]), whole)


@pytest.mark.parametrize("env", ENVS)
def test_logged_metrics_and_rollouts_are_the_global_ones_on_every_rank(runs, env):
    one, (rank0, rank1) = runs[env]["one"], runs[env]["two"]
    assert rank0["metrics"] == rank1["metrics"]
    trained = [k for k in one["metrics"] if k.split("/")[0] in ("q", "cql", "reward")]
    assert {"q/td_loss", "reward/loss", "reward/std", "cql/gap"} <= set(trained)
    for key in trained:  # means over the global batch, whatever the number of processes
        assert rank0["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-5), key
    for key in ("val/expert_nll", "val/reward_mean"):
        assert rank0["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-5), key
    # Rank 0 ran the episodes; rank 1 received the same result; no rank waited forever.
    assert rank0["rollout"] == rank1["rollout"]
    assert rank0["rollout"]["updates"] == UPDATES and len(rank0["rollout"]["returns"]) == 1
    assert rank0["rollout"]["return"] == pytest.approx(one["rollout"]["return"], rel=1e-6)


# ----------------------------------------------------------------------------- no processes needed
def test_shards_of_a_global_batch_concatenate_to_the_single_process_batch(tiny):
    ids = tiny.ids("pendulum")
    whole = OfflineIRLDataModule(*ids, batch_size=12, expert_batch_size=8, data_on_device=False, seed=5)
    whole.setup("fit")
    reference = [whole.sample_batch() for _ in range(3)]
    shards = []
    for rank in range(4):
        dm = OfflineIRLDataModule(*ids, batch_size=12, expert_batch_size=8, data_on_device=False, seed=5)
        dm.setup("fit")
        dm._configure_shards(4, rank)
        shards.append([dm.sample_batch() for _ in range(3)])
    for step in range(3):
        for part, size in (("offline", 3), ("expert", 2)):
            for key, value in reference[step][part].items():
                pieces = [shards[rank][step][part][key] for rank in range(4)]
                assert all(p.shape[0] == size for p in pieces)
                assert torch.equal(torch.cat(pieces), value)


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(tiny):
    assert shard_size(256, 8) == 32
    with pytest.raises(ValueError, match=r"batch_size=30 is the global batch over all 4 processes.*use 28 or 32"):
        shard_size(30, 4)
    dm = OfflineIRLDataModule(*tiny.ids("cartpole"), batch_size=32, expert_batch_size=10, data_on_device=False)
    dm.setup("fit")
    with pytest.raises(ValueError, match="expert_batch_size=10 .* 4 processes"):
        dm._configure_shards(4, 0)


def test_box_proposal_samples_of_a_shard_are_the_rows_of_the_global_draw(monkeypatch):
    spaces = dict(obs_kind="box", obs_dim=3, action_kind="box", action_dim=2, action_low=[-2.0, -1.0],
                  action_high=[2.0, 1.0])
    torch.manual_seed(0)
    model = BiCQLML(spaces=spaces, hidden_sizes=[8], proposal_hidden_sizes=[8], num_action_samples=5)
    obs = torch.randn(6, 3)  # two parts, as in the reward step: 4 expert then 2 offline states
    start = model._rng().get_state()
    whole, whole_logp = model._sample_actions(obs, segments=(4, 2))
    assert not torch.equal(model._sample_actions(obs, segments=(4, 2))[0], whole)  # the stream moves on
    for rank in range(2):  # every rank's stream is in the same state
        model._rng().set_state(start)
        monkeypatch.setattr(model, "_world", lambda rank=rank: (2, rank))
        rows = [2 * rank, 2 * rank + 1, 4 + rank]  # its halves of both parts
        actions, logp = model._sample_actions(obs[rows], segments=(2, 1))
        assert torch.equal(actions, whole[rows])
        # The density of the same draws; a smaller batch may take another SIMD path (last bits).
        torch.testing.assert_close(logp, whole_logp[rows], rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("env", ENVS)
def test_bf16_mixed_precision_trains_without_dtype_errors(tiny, tmp_path, env):
    L.seed_everything(0, verbose=False)
    dm = OfflineIRLDataModule(*tiny.ids(env), batch_size=32, batches_per_epoch=4, val_size=64)
    model = BiCQLML(hidden_sizes=[32, 32], reward_hidden_sizes=[32, 32], proposal_hidden_sizes=[32, 32],
                    proposal_fit_steps=10, num_action_samples=4, policy={"init_args": {"num_candidates": 8, "hidden_sizes": [16], "fit_steps": 20}})
    trainer = L.Trainer(max_epochs=1, precision="bf16-mixed", accelerator="cpu", devices=1, logger=False,
                        log_every_n_steps=2, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert model.updates == 4
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["q/td_loss"] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay float32
    assert np.isfinite(model.act(dm.expert_store.tensors["obs"][:4].numpy()).astype(float)).all()


def test_transition_store_share_is_a_slice_of_the_global_indices():
    class T:  # one episode of 10 transitions
        episode_observations = np.arange(22, dtype=np.float32).reshape(11, 2)
        episode_ids = np.zeros(10, np.int32)
        actions = np.arange(10)
        rewards = np.zeros(10, np.float32)
        terminations = np.zeros(10, bool)

    store = TransitionStore(T)
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 10, (6,), generator=g)
    g.manual_seed(0)
    share = store.sample(6, g, world_size=3, rank=2)
    assert torch.equal(share["action"], index[4:6])
