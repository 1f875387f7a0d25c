"""bench.reward_returns: what decides a return Spearman when most episodes are paid almost nothing."""

import numpy as np
import pytest

from bench.reward_returns import diagnostics


def test_the_episodes_a_reward_pays_almost_nothing_are_counted_and_ranked_apart():
    # Five episodes paid for (ranked right) and five paid under 1 % of the best (ranked backwards).
    true = np.arange(10, dtype=float)
    learned = np.array([0.05, 0.04, 0.03, 0.02, 0.01, 10.0, 20.0, 30.0, 40.0, 50.0])
    ep = {"learned": learned, "true": true, "length": np.full(10, 100.0), "at_floor": np.zeros(10)}
    out = diagnostics(ep)
    assert out["episodes_paid_little"] == 5
    assert out["return_spearman_paid_little"] == pytest.approx(-1.0)
    assert out["return_spearman_rest"] == pytest.approx(1.0)
    # Over all ten the backwards five cost the whole ranking: 1 - 6 * 40 / 990.
    assert out["return_spearman"] == pytest.approx(1 - 6 * 40 / 990)


def test_too_few_episodes_on_a_side_give_no_correlation_there():
    ep = {"learned": np.array([0.0, 5.0, 6.0, 7.0]), "true": np.arange(4.0), "length": np.ones(4),
          "at_floor": np.zeros(4)}
    out = diagnostics(ep)
    assert out["episodes_paid_little"] == 1
    assert out["return_spearman_paid_little"] is None
    assert out["return_spearman_rest"] == pytest.approx(1.0)
