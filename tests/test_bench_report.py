"""bench.report: several results files merge into one table; a run passed twice is refused."""

import json

import pytest

from bench.report import main


def _row(seed, score, algo="bc"):
    return {"task": "hopper", "regime": "expert-only", "N": 1, "algo": algo, "seed": seed,
            "normalized_score": score, "reward_corr_mixed": None, "reward_corr_heldout": None,
            "updates": 20000, "wall_s": 40.0, "machine": "test machine, 1 threads"}


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_more_seeds_in_a_second_file_join_the_first_files_cells(tmp_path, capsys):
    first = _write(tmp_path / "full.jsonl", [_row(0, 90.0), _row(1, 100.0), _row(2, 95.0)])
    extra = _write(tmp_path / "extra.jsonl", [_row(3, 80.0), _row(4, 85.0), _row(5, 90.0)])
    main([first, extra, "--out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "table.md").read_text()
    # Six seeds, mean 90.0, population standard deviation sqrt(250 / 6) = 6.45.
    assert "| hopper | expert-only | full | 1 | bc | 6 | 90.0 ± 6.5 |" in table  # version-1 rows: full demos
    assert (tmp_path / "report" / "scores.png").stat().st_size > 0


def test_a_run_in_two_files_is_refused_and_nothing_is_written(tmp_path):
    first = _write(tmp_path / "full.jsonl", [_row(0, 90.0), _row(1, 100.0)])
    again = _write(tmp_path / "again.jsonl", [_row(1, 50.0)])
    with pytest.raises(SystemExit, match=r"again.jsonl repeats the run \('hopper', 'expert-only', 'full', 1, 'bc', 1\)"):
        main([first, again, "--out", str(tmp_path / "report")])
    assert not (tmp_path / "report").exists()


def _v2(algo, score, regime="with-mixed", demos="sub20", seed=0, **extra):
    return {**_row(seed, score, algo), "regime": regime, "demos": demos, **extra}


def test_summary_puts_the_five_methods_of_a_cell_side_by_side_and_judges_its_targets(tmp_path):
    rows = [_v2("iql_oracle", 100.0), _v2("bc", 3.0), _v2("bc_all", 60.0), _v2("iql_transfer", 85.0),
            _v2("bicql", 92.0, return_spearman_mixed=0.95, return_spearman_medium=0.5),
            _v2("bicql", 80.0, seed=1, return_spearman_mixed=0.87, return_spearman_medium=0.7)]
    main([_write(tmp_path / "v2.jsonl", rows), "--out", str(tmp_path / "report")])
    line = next(l for l in (tmp_path / "report" / "summary.md").read_text().splitlines() if l.startswith("| hopper"))
    cols = [c.strip() for c in line.strip("|").split("|")]
    assert cols[4:9] == ["100.0", "3.0", "60.0", "86.0 ± 6.0", "85.0"]  # oracle, BC, BC-all, BiCQL-ML, IQL-transfer
    assert cols[9] == "0.85" and cols[10] == "0.91 / 0.60" and cols[11] == "1/2"
    # Means: BiCQL-ML 86 ≥ 90 fails by 4; max(BC, BC-all) = 60 < 80, so 86 ≥ 70 holds; 85 < 90.
    assert cols[12] == ("BiCQL-ML ≥ 0.9 × oracle: missed by 4.0; BiCQL-ML ≥ max(BC, BC-all) + 10: met; "
                        "IQL on the reward ≥ 0.9 × oracle: missed by 5.0; Spearman mixed ≥ 0.9: met; "
                        "Spearman medium ≥ 0.8: missed by 0.20")


def test_expert_only_targets_compare_with_bc_at_n1_and_with_95_at_n10():
    from bench.report import targets

    assert targets("expert-only", "full", 1, {"bicql": 97.5, "bc": 100.0}, (None, None)) == ["BiCQL-ML ≥ BC − 3: met"]
    assert targets("expert-only", "full", 10, {"bicql": 93.0}, (None, None)) == ["BiCQL-ML ≥ 95: missed by 2.0"]
    assert targets("with-medium", "full", 1, {"bicql": 90.0, "bc": 95.0, "bc_all": 40.0}, (None, None)) == \
        ["BiCQL-ML ≥ max(BC, BC-all) − 3: missed by 2.0"]
