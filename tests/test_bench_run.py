"""bench.run's cell selection: a subset of a tier's cells, refused before any data is read."""

import argparse

import pytest

import numpy as np

from bench.run import TIERS, choose_precision, main, parse_cell, plan_cells, set_precision, spearman
from bicql_lightning.precision import cpu_bf16_slowdown, is_bf16


def test_a_cell_is_regime_demonstrations_n_and_full_by_default():
    assert parse_cell("expert-only:10") == ("expert-only", "full", 10)
    assert parse_cell("with-mixed:sub20:1") == ("with-mixed", "sub20", 1)
    for bad in ("with-mixed", "with-mixed:one", ":", "with-mixed:sub5:1"):
        with pytest.raises(argparse.ArgumentTypeError, match="a cell is REGIME"):
            parse_cell(bad)


def test_cells_outside_the_tier_are_refused_before_the_manifest_is_read(tmp_path, capsys):
    assert ("with-mixed", "full", 1) in TIERS["full"]["cells"] and ("with-mixed", "full", 1) not in TIERS["quick"]["cells"]
    results = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(tmp_path / "missing.json"), "--data", str(tmp_path), "--tier", "quick",
              "--results", str(results), "--cells", "expert-only:1", "with-mixed:1"])
    assert exit_info.value.code == 2
    assert "--cells [('with-mixed', 'full', 1)] are not in the quick tier's cells" in capsys.readouterr().err
    assert not results.exists()


class _Task:
    def __init__(self, name, medium=True):
        self.name = name
        self.medium_file = "medium.npz" if medium else None


def test_seeds_beyond_the_tier_add_runs_of_its_cells_and_skip_finished_ones():
    tasks = [_Task("hopper"), _Task("walker2d")]
    done = {("walker2d", "expert-only", "full", 1, "bc", 4)}
    plan = plan_cells(tasks, TIERS["full"], ["bicql", "bc"], [3, 4, 5], [("expert-only", "full", 1)], done, None)
    keys = [(task.name, *rest) for task, *rest in plan]
    assert len(keys) == 2 * 2 * 3 - 1
    assert {key[5] for key in keys} == {3, 4, 5}
    assert ("walker2d", "expert-only", "full", 1, "bc", 4) not in keys


def test_the_quick_tier_is_protocol_two_and_medium_cells_need_a_medium_policy():
    plan = plan_cells([_Task("hopper"), _Task("ant", medium=False)], TIERS["quick"], None, None, None, set(), None)
    keys = {(task.name, regime, demos, n, algo) for task, regime, demos, n, algo, seed in plan}
    assert {seed for *_, seed in plan} == {0}
    hopper = {k[1:] for k in keys if k[0] == "hopper"}
    # bicql and bc in three cells; bc_all and both IQL runs where D holds more than D_E.
    assert len(hopper) == 3 * 2 + 2 * 3
    assert ("with-medium", "sub20", 1, "iql_transfer") in hopper and ("expert-only", "full", 1, "iql_oracle") not in hopper
    assert not any(k[0] == "ant" and k[1] == "with-medium" for k in keys)
    # The IQL run on a cell's learned reward is planned after that cell's BiCQL-ML run.
    order = [(t.name, r, d, n, a) for t, r, d, n, a, _ in plan]
    assert order.index(("hopper", "with-mixed", "sub20", 1, "bicql")) < order.index(
        ("hopper", "with-mixed", "sub20", 1, "iql_transfer"))
    rest = plan_cells([_Task("hopper")], TIERS["full"], ["bicql"], None, None, set(), "quick")
    assert len(rest) == 6 * 3 - 3  # the full tier's BiCQL-ML runs minus the quick tier's three


def test_spearman_is_the_rank_correlation_with_tied_ranks_shared():
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 35.0, 100.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # Ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): Pearson of the ranks.
    expected = np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
    assert spearman(np.array([0.0, 5.0, 5.0, 9.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(expected)


def test_auto_precision_trains_in_float32_only_where_bf16_is_emulated_on_the_cpu():
    bf16_cpu = {"accelerator": "cpu", "precision": "bf16-mixed"}
    slow, fast = (lambda: True), (lambda: False)
    assert choose_precision(bf16_cpu, "auto", slow) == "32-true"
    assert choose_precision(bf16_cpu, "auto", fast) == "bf16-mixed"

    def not_asked():
        raise AssertionError("the CPU was measured where its bf16 speed does not matter")
    # a GPU keeps the config's bf16; a float32 config stays as it is; neither measures the CPU
    assert choose_precision({"accelerator": "gpu", "precision": "bf16-mixed"}, "auto", not_asked) == "bf16-mixed"
    assert choose_precision({"precision": "32-true"}, "auto", not_asked) == "32-true"
    assert choose_precision({}, "auto", not_asked) is None
    # an explicit request wins, slow or not
    assert choose_precision(bf16_cpu, "bf16-mixed", not_asked) == "bf16-mixed"
    assert choose_precision({"precision": "32-true"}, "bf16-mixed", not_asked) == "bf16-mixed"


def test_set_precision_writes_the_pick_and_returns_what_the_config_named(monkeypatch):
    monkeypatch.setattr("bench.run.bf16_is_slow_on_cpu", lambda: True)
    trainer = {"accelerator": "cpu", "precision": "bf16-mixed"}
    assert set_precision(trainer, "auto") == "bf16-mixed" and trainer["precision"] == "32-true"
    trainer = {}
    assert set_precision(trainer, "auto") is None and "precision" not in trainer


def test_the_bf16_slowdown_is_a_measured_positive_ratio_and_bf16_settings_are_recognised():
    ratio = cpu_bf16_slowdown()
    assert 0.0 < ratio < 1e4 and cpu_bf16_slowdown() == ratio  # measured once per process
    assert is_bf16("bf16-mixed") and is_bf16("bf16-true") and not is_bf16("32-true") and not is_bf16(None)


@pytest.mark.parametrize("algo", ["iqlearn", "bicql"])
def test_reward_correlation_scores_a_dataset_in_chunks_as_in_one_pass(tiny, monkeypatch, algo):
    import gymnasium as gym
    import torch

    import bench.run as run
    from bicql_lightning import BiCQLML, IQLearn
    from bicql_lightning.spaces import space_spec

    env = gym.make("Pendulum-v1")
    spaces = space_spec(env.observation_space, env.action_space)
    torch.manual_seed(0)
    model = (IQLearn(spaces=spaces, hidden_sizes=[16], actor_hidden_sizes=[16]) if algo == "iqlearn"
             else BiCQLML(spaces=spaces, hidden_sizes=[16]))
    monkeypatch.setattr(run, "REWARD_CHUNK", 1 << 20)
    whole = run.reward_correlation(model, tiny.pendulum_mixed)
    monkeypatch.setattr(run, "REWARD_CHUNK", 7)  # 150 transitions: 22 chunks, the last one short
    chunked = run.reward_correlation(model, tiny.pendulum_mixed)
    assert np.isfinite(whole) and abs(whole) > 1e-3
    assert chunked == pytest.approx(whole, abs=1e-6)


def test_a_transfer_cell_skipped_for_a_missing_checkpoint_stays_unclaimed_for_the_process_that_finds_it(
        tmp_path, monkeypatch):
    import bench.run as run

    ran = []
    monkeypatch.setattr(run, "read_manifest", lambda path: [_Task("hopper")])
    monkeypatch.setattr(run, "set_precision", lambda trainer, requested: trainer.get("precision"))
    monkeypatch.setattr(run, "run_cell", lambda task, regime, n, algo, seed, *rest: ran.append((algo, seed)) or {})
    monkeypatch.setattr(run, "report", lambda results, row: None)
    checkpoints, claims = tmp_path / "checkpoints", tmp_path / "claims"
    argv = ["--manifest", "m.json", "--data", str(tmp_path), "--tier", "full", "--tasks", "hopper",
            "--cells", "with-mixed:sub20:1", "--algos", "iql_transfer", "--seeds", "0",
            "--checkpoints", str(checkpoints), "--claims", str(claims), "--results", str(tmp_path / "rows.jsonl")]
    main(argv)  # the BiCQL-ML seed is still training elsewhere: nothing to run, nothing claimed
    assert ran == [] and list(claims.iterdir()) == []
    path = run.checkpoint_path(checkpoints, _Task("hopper"), "with-mixed", "sub20", 1, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    main(argv)  # its checkpoint is there now: this process claims and runs the cell
    main(argv)  # and a second process sharing the claims skips it
    assert ran == [("iql_transfer", 0)] and len(list(claims.iterdir())) == 1
