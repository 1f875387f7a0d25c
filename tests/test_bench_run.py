"""bench.run's cell selection: a subset of a tier's cells, refused before any data is read."""

import argparse

import pytest

from bench.run import TIERS, main, parse_cell


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
