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
