"""bench.run's cell selection: a subset of a tier's cells, refused before any data is read."""

import argparse

import pytest

from bench.run import TIERS, choose_precision, main, parse_cell, plan_cells, set_precision
from bicql_lightning.precision import cpu_bf16_slowdown, is_bf16


def test_a_cell_is_regime_colon_n():
    assert parse_cell("expert-only:10") == ("expert-only", 10)
    assert parse_cell("with-mixed:1") == ("with-mixed", 1)
    for bad in ("with-mixed", "with-mixed:one", ":"):
        with pytest.raises(argparse.ArgumentTypeError, match="a cell is REGIME:N"):
            parse_cell(bad)


def test_cells_outside_the_tier_are_refused_before_the_manifest_is_read(tmp_path, capsys):
    assert ("with-mixed", 10) in TIERS["full"]["cells"] and ("with-mixed", 10) not in TIERS["quick"]["cells"]
    results = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", str(tmp_path / "missing.json"), "--data", str(tmp_path), "--tier", "quick",
              "--results", str(results), "--cells", "expert-only:1", "with-mixed:10"])
    assert exit_info.value.code == 2
    assert "--cells [('with-mixed', 10)] are not in the quick tier's cells" in capsys.readouterr().err
    assert not results.exists()


class _Task:
    def __init__(self, name):
        self.name = name


def test_seeds_beyond_the_tier_add_runs_of_its_cells_and_skip_finished_ones():
    tasks = [_Task("hopper"), _Task("walker2d")]
    done = {("walker2d", "expert-only", 1, "bc", 4)}
    plan = plan_cells(tasks, TIERS["full"], ["bicql", "bc"], [3, 4, 5], [("expert-only", 1)], done, None)
    keys = [(task.name, regime, n, algo, seed) for task, regime, n, algo, seed in plan]
    assert len(keys) == 2 * 2 * 3 - 1
    assert {key[4] for key in keys} == {3, 4, 5}
    assert ("walker2d", "expert-only", 1, "bc", 4) not in keys
    assert {(key[1], key[2]) for key in keys} == {("expert-only", 1)}


def test_without_seeds_a_tier_runs_its_own_and_bc_all_only_with_mixed_data():
    plan = plan_cells([_Task("hopper")], TIERS["quick"], None, None, None, set(), None)
    keys = {(regime, n, algo, seed) for _, regime, n, algo, seed in plan}
    assert {seed for *_, seed in keys} == {0}
    assert len(keys) == 3 * 2 + 1  # bicql and bc in three cells, bc_all in with-mixed:1 only
    assert ("with-mixed", 1, "bc_all", 0) in keys and ("expert-only", 1, "bc_all", 0) not in keys
    rest = plan_cells([_Task("hopper")], TIERS["full"], ["bicql"], None, None, set(), "quick")
    assert len(rest) == 4 * 3 - 3  # the full tier's BiCQL-ML runs minus the quick tier's three


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
