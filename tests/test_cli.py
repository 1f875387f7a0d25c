"""Every mistake a user can make on `bicql fit` ends with one line on stderr and exit status 2."""

from __future__ import annotations

import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from bicql_lightning import BehaviorCloning, BiCQLML
from conftest import bicql

TINY = ["--seed_everything", "0", "--trainer.max_epochs", "1", "--data.batches_per_epoch", "5", "--data.batch_size", "16",
        "--data.val_size", "16", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--model.init_args.hidden_sizes", "[16]", "--model.init_args.proposal_fit_steps", "5"]


def fit(tiny, tmp_path, *args, env=None):
    base = ["fit", "--data.expert_dataset", tiny.cartpole_expert, "--data.offline_dataset", "null", *TINY]
    return bicql(base + list(args), env={"MINARI_DATASETS_PATH": str(tiny.root), **(env or {})}, cwd=tmp_path)


def assert_one_line(run, *fragments):
    # Lightning's own "Seed set to 0" may come first; the error is the one other line.
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("Seed set to")]
    assert run.returncode == 2, run.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("bicql: error: "), run.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in run.stdout + run.stderr


@pytest.fixture(scope="module")
def bad_datasets(tiny_data):
    """A dataset with a NaN reward and one with another observation space, beside the tiny ones."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tiny_data.root))
        obs = np.zeros((4, 4), np.float32)
        nan = EpisodeBuffer(observations=obs, actions=np.zeros(3, np.int64), rewards=[0.0, np.nan, 1.0],
                            terminations=[False] * 3, truncations=[False, False, True])
        with pytest.warns(UserWarning):
            minari.create_dataset_from_buffers("tiny/cartpole/nan-v0", [nan], env="CartPole-v1", data_format="hdf5")
    return {"nan": "tiny/cartpole/nan-v0"}


def test_an_unknown_dataset_offline_says_it_is_not_local_and_cannot_be_fetched(tiny, tmp_path):
    run = fit(tiny, tmp_path, "--data.expert_dataset", "tiny/nope/expert-v0")
    assert_one_line(run, "'tiny/nope/expert-v0'", "bicql dataset")


def test_nan_in_the_data_names_the_field(tiny, tmp_path, bad_datasets):
    run = fit(tiny, tmp_path, "--data.expert_dataset", bad_datasets["nan"])
    assert_one_line(run, "'rewards'", "non-finite")


def test_mismatched_spaces_name_both_datasets(tiny, tmp_path):
    run = fit(tiny, tmp_path, "--data.offline_dataset", tiny.pendulum_mixed)
    assert_one_line(run, "different observation spaces", "same environment")


def test_more_episodes_than_exist_says_how_many_there_are(tiny, tmp_path):
    run = fit(tiny, tmp_path, "--data.expert_episodes", "9")
    assert_one_line(run, "asked for 9 episodes", "hold 3 episodes", "at most 3")


@pytest.mark.parametrize("args, fragment", [
    (["--model.init_args.gama", "0.9"], "BiCQLML has no setting 'gama'"),
    (["--data.bacth_size", "8"], "unrecognized arguments: --data.bacth_size"),
    (["--model.init_args.gamma", "1.5"], "gamma must be in [0, 1)"),
    (["--model.init_args.policy", '{"class_path": "Nope"}'], "policy class_path 'Nope' is not a policy"),
    (["--model.init_args.termination", "sometimes"], "BiCQLML setting 'termination': Expected a typing.Literal"),
], ids=["model-key", "data-key", "bad-value", "bad-policy", "bad-choice"])
def test_a_wrong_config_key_or_value_is_one_line(tiny, tmp_path, args, fragment):
    assert_one_line(fit(tiny, tmp_path, *args), fragment)


def test_a_checkpoint_of_another_model_is_refused_and_nothing_trains(tiny, tmp_path):
    run = fit(tiny, tmp_path, "--model", "bicql_lightning.BehaviorCloning", "--trainer.logger", "false",
              "--trainer.enable_checkpointing", "true", "--trainer.default_root_dir", "bc",
              "--model.init_args.hidden_sizes", "[16]", "--model.init_args.proposal_fit_steps", "5")
    # BehaviorCloning takes no proposal_fit_steps: that run itself is refused in one line.
    assert_one_line(run, "BehaviorCloning has no setting 'proposal_fit_steps'")
    base = ["fit", "--seed_everything", "0", "--data.expert_dataset", tiny.cartpole_expert,
            "--data.offline_dataset", "null", "--trainer.max_epochs", "1", "--data.batches_per_epoch", "5", "--data.batch_size", "16",
            "--data.val_size", "16", "--trainer.logger", "false"]
    env = {"MINARI_DATASETS_PATH": str(tiny.root)}
    bc = bicql(base + ["--model", "bicql_lightning.BehaviorCloning", "--trainer.default_root_dir", "bc"],
               env=env, cwd=tmp_path)
    assert bc.returncode == 0, bc.stderr[-2000:]
    (ckpt,) = (tmp_path / "bc" / "checkpoints").glob("*.ckpt")
    assert BehaviorCloning.load_from_checkpoint(ckpt).updates == 5
    before = ckpt.read_bytes()
    run = fit(tiny, tmp_path, "--ckpt_path", str(ckpt))
    assert_one_line(run, str(ckpt), "holds a BehaviorCloning model, not a BiCQLML")
    assert "Rollout evaluation" not in run.stdout and "update " not in run.stdout
    assert ckpt.read_bytes() == before  # nothing the user had is touched


def test_a_truncated_or_missing_checkpoint_names_the_path(tiny, tmp_path):
    model = BiCQLML(spaces=dict(obs_kind="box", obs_dim=4, action_kind="discrete", action_dim=2, action_low=[],
                                action_high=[]), hidden_sizes=[16])
    import lightning as L
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(model)
    whole = tmp_path / "whole.ckpt"
    trainer.save_checkpoint(whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_one_line(fit(tiny, tmp_path, "--ckpt_path", str(truncated)), str(truncated), "truncated")
    assert_one_line(fit(tiny, tmp_path, "--ckpt_path", str(tmp_path / "gone.ckpt")), "gone.ckpt", "does not exist")


def test_the_traceback_is_shown_on_request(tiny, tmp_path):
    run = fit(tiny, tmp_path, "--data.expert_episodes", "9", "--traceback")
    assert run.returncode != 0 and "Traceback" in run.stderr and "asked for 9 episodes" in run.stderr
    run = fit(tiny, tmp_path, "--data.expert_episodes", "9", env={"BICQL_TRACEBACK": "1"})
    assert "Traceback" in run.stderr


def test_help_lists_every_subcommand():
    run = bicql(["--help"])
    assert run.returncode == 0
    for sub in ("fit", "validate", "test", "predict", "dataset"):
        assert f"  {sub} " in run.stdout


def test_a_run_whose_output_is_a_file_prints_plain_progress_lines_and_no_tips(tiny, tmp_path):
    run = fit(tiny, tmp_path, "--trainer.callbacks+=bicql_lightning.RolloutEvaluation",
              "--trainer.callbacks.every_n_updates=0", "--trainer.callbacks.episodes=1",
              "--data.batches_per_epoch", "500")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "update 500/500 (100%)" in run.stdout and "updates/s" in run.stdout
    assert "normalised score" in run.stdout
    for noise in ("Tip:", "LeafSpec", "weights_only", "v_num"):
        assert noise not in run.stdout + run.stderr
