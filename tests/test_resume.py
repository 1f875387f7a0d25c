"""Killed and resumed: a run SIGKILLed mid-training and restarted with ``bicql fit
--ckpt_path last`` ends exactly where an uninterrupted run ends, and a crash while a
checkpoint is being written never costs the previous ``last.ckpt``.

The runs use the real command line in subprocesses on the tiny Pendulum data (Box
actions: the module's proposal stream is exercised too). ``KillAtUpdate`` (given by class
path) SIGKILLs its own process after a chosen update.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from bicql_lightning import BiCQLML
from bicql_lightning.distributed import AtomicCheckpointIO

TESTS = Path(__file__).resolve().parent
UPDATES_PER_EPOCH, EPOCHS = 6, 2  # 12 updates, 24 optimizer steps
CHECKPOINT_EVERY_STEPS = 8  # last.ckpt after updates 4, 8 and 12
KILL_AT_UPDATE = 10  # mid-epoch 2, two updates after the checkpoint of update 8


class KillAtUpdate(Callback):
    """SIGKILL this process at the end of update ``update``: no cleanup, no final checkpoint."""

    def __init__(self, update: int):
        self.update = update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.updates == self.update:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def config(root: Path, kill_at: int | None) -> dict:
    callbacks = [
        {"class_path": "bicql_lightning.TargetNetworkUpdate", "init_args": {"tau": 0.1}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": CHECKPOINT_EVERY_STEPS}},
    ]
    if kill_at is not None:
        callbacks.insert(1, {"class_path": "test_resume.KillAtUpdate", "init_args": {"update": kill_at}})
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": EPOCHS, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 2,
                    "default_root_dir": str(root), "callbacks": callbacks},
        "model": {"hidden_sizes": [32, 32], "reward_hidden_sizes": [32, 32], "proposal_hidden_sizes": [32, 32],
                  "proposal_fit_steps": 20, "num_action_samples": 4, "policy": {"init_args": {"num_candidates": 8, "hidden_sizes": [16], "fit_steps": 20}}, "q_lr": 1e-3,
                  "reward_lr": 1e-3},
        "data": {"expert_dataset": "tiny/pendulum/expert-v0", "offline_dataset": "tiny/pendulum/mixed-v0",
                 "batch_size": 32, "batches_per_epoch": UPDATES_PER_EPOCH, "val_size": 64, "seed": 0},
    }


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    script = Path(sys.executable).with_name("bicql")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "bicql_lightning.cli"]
    return subprocess.Popen(cmd + args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"run timed out after {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tiny_data.root), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    for name, run_dir, kill_at in (("straight", "straight", None), ("killed", "interrupted", KILL_AT_UPDATE),
                                   ("resumed", "interrupted", None)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config(root / run_dir, kill_at)))
    # The uninterrupted run and the run that will be killed, side by side.
    straight = start(["fit", "--config", str(root / "straight.yaml")], env, root)
    killed = start(["fit", "--config", str(root / "killed.yaml")], env, root)
    straight_code, straight_log = finish(straight)
    killed_code, killed_log = finish(killed)
    assert straight_code == 0, straight_log[-3000:]
    assert killed_code == -signal.SIGKILL, killed_log[-3000:]
    checkpoints = root / "interrupted" / "checkpoints"
    at_kill = load(checkpoints / "last.ckpt")
    # The same configuration without the kill, resumed from the newest last.ckpt.
    code, resumed_log = finish(start(["fit", "--config", str(root / "resumed.yaml"), "--ckpt_path", "last"], env, root))
    assert code == 0, resumed_log[-3000:]
    return {"straight": load(root / "straight" / "checkpoints" / "last.ckpt"), "at_kill": at_kill,
            "resumed": load(checkpoints / "last.ckpt"), "resumed_log": resumed_log, "checkpoints": checkpoints}


def test_the_killed_run_left_the_checkpoint_of_update_8(runs):
    at_kill = runs["at_kill"]
    assert at_kill["bicql_lightning"]["updates"] == 8 and at_kill["global_step"] == 16
    assert at_kill["epoch"] == 1  # mid-epoch: the second epoch's updates 7..12
    assert "generator" in at_kill["bicql_lightning"]  # the proposal stream
    assert "generator" in at_kill["OfflineIRLDataModule"]  # the index sampler


def test_kill_and_resume_ends_where_an_uninterrupted_run_ends(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    assert "Restoring states from the checkpoint path at" in runs["resumed_log"]
    assert str(runs["checkpoints"] / "last.ckpt") in runs["resumed_log"]
    assert resumed["bicql_lightning"]["updates"] == straight["bicql_lightning"]["updates"] == 12
    assert resumed["global_step"] == straight["global_step"] == 24
    # Every weight, the target network, the fitted proposal and the normalisation, bit for bit.
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    assert any(k.startswith("target_q_net.") for k in straight["state_dict"])
    assert straight["state_dict"]["encoder.std"].sub(1).abs().max() > 1e-3  # real statistics, not (0, 1)
    # Both Adam states.
    for opt_a, opt_b in zip(straight["optimizer_states"], resumed["optimizer_states"], strict=True):
        assert len(opt_a["state"]) > 0
        for state_a, state_b in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(state_a[key], state_b[key]), key
    # The random streams: the proposal's and the index sampler's, and the data statistics.
    assert torch.equal(straight["bicql_lightning"]["generator"], resumed["bicql_lightning"]["generator"])
    for key in ("generator", "obs_mean", "obs_std"):
        assert torch.equal(straight["OfflineIRLDataModule"][key], resumed["OfflineIRLDataModule"][key]), key
    # And it trained: the resumed run's weights differ from those at the kill checkpoint.
    moved = max((resumed["state_dict"][k] - runs["at_kill"]["state_dict"][k]).abs().max().item()
                for k in straight["state_dict"] if k.startswith("q_net."))
    assert moved > 1e-4


def test_a_mid_epoch_resume_is_not_flagged_as_unreliable(runs):
    # The batch stream is stateless (its draws are the data module's, in the checkpoint),
    # so it tells Lightning it can be resumed mid-epoch.
    assert "not resumable" not in runs["resumed_log"]


# ----------------------------------------------------------------------------- atomic writes
CRASH_WHILE_WRITING = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    from bicql_lightning.distributed import AtomicCheckpointIO

    real_save = torch.save

    def dying_save(obj, f):  # half the bytes reach the file, then the process dies
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    AtomicCheckpointIO().save_checkpoint({"version": 2, "weights": torch.ones(100_000)}, sys.argv[1])
""")


def test_a_crash_while_writing_leaves_the_previous_last_ckpt_loadable(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"version": 1, "weights": torch.zeros(100_000)}, target)
    crash = subprocess.run([sys.executable, "-c", CRASH_WHILE_WRITING, str(target)], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-2000:]
    partial = [p for p in target.parent.iterdir() if p != target]
    assert len(partial) == 1 and partial[0].stat().st_size > 100_000 // 2  # it did die mid-write ...
    assert "last" not in partial[0].name and partial[0].suffix != ".ckpt"  # ... never taken for a checkpoint
    checkpoint = torch.load(target, weights_only=False)  # ... and last.ckpt is the previous, whole one
    assert checkpoint["version"] == 1 and torch.equal(checkpoint["weights"], torch.zeros(100_000))
    # The next save replaces it and sweeps the dead process's leftover.
    AtomicCheckpointIO().save_checkpoint({"version": 3}, target)
    assert torch.load(target, weights_only=False) == {"version": 3}
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_bicqlml_makes_the_trainers_default_checkpoint_io_atomic(tiny, tmp_path):
    import lightning as L
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from bicql_lightning import OfflineIRLDataModule

    class CustomIO(TorchCheckpointIO):
        pass

    for plugins, expected in (([], AtomicCheckpointIO), ([CustomIO()], CustomIO)):
        trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                            plugins=plugins, limit_val_batches=0)
        dm = OfflineIRLDataModule(*tiny.ids("cartpole"), batch_size=16, batches_per_epoch=1)
        trainer.fit(BiCQLML(hidden_sizes=[8], reward_hidden_sizes=[8]), dm)
        assert type(trainer.strategy.checkpoint_io) is expected  # a user's own plugin is kept
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    assert BiCQLML.load_from_checkpoint(tmp_path / "x.ckpt").updates == 1
