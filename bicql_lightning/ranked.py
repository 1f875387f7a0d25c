r"""The learned reward as a rank among the logged data's pairs, for RL from scratch.

BiCQL-ML's reward is bounded, :math:`b\tanh(x/b) + o`, and the expert's likelihood leaves
its level free. Under the free level most of the logged data D sits on the bound's floor
(on hopper with-mixed, 80 % of D's pairs within 0.01 of 0) while the network's output
:math:`x` before the bound still orders them: D's median pair at :math:`x \approx -32`,
the expert's at :math:`-4`. An agent that learns online from scratch reads only the
bounded reward, which is the same 0 wherever it goes.

``RankedReward`` pays a pair the share of D's pairs whose :math:`x` it exceeds,

.. math:: r'(s, a) = \hat F_D\big(x(s, a)\big) \in [0, 1],

:math:`\hat F_D` the empirical distribution of :math:`x` over D (linear between D's
values, so the reward is continuous). Ranks keep the reward's order on every pair (a
monotone map of it) and discard its scale, the part the floor destroyed. Every step pays
something between 0 and 1, as much as the ``constant`` survival reward at most, and D's
median pair pays 0.5, so staying up is worth something and the expert's pairs are worth
most. It is a new reward, not the learned one: a monotone map changes which policies
are optimal, which is why it is an option, not the learned reward's default. On hopper
(SAC, 100k steps) it made SAC stand, as a freshly initialised network ranked the same way
does: docs/reward_transfer.md.

The same ranks apply to any scorer of pairs: :class:`~bicql_lightning.SoftAdvantage`
(the module's :math:`Q(s,a) - V(s)`, which scores the action given the state) ranks
with ``RankedReward.from_checkpoint(path, dataset_id, score="soft_advantage")``, and
:class:`~bicql_lightning.PolicyLogLikelihood` (the controller's :math:`\log\pi(a|s)`) with
``score="log_likelihood"``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from .reward import RewardNet


# Pairs per forward pass: a soft advantage scores 64 proposal actions for each pair, so a
# whole dataset in one pass would take tens of GB.
CHUNK = 2_048


@torch.no_grad()
def pair_scores(scorer: Any, state: torch.Tensor, action: torch.Tensor) -> np.ndarray:
    """What a ranked reward orders by, ``(B,)`` float64, in chunks: a ``RewardNet``'s output
    before its bound, or a scorer's own output (``SoftAdvantage``, ``PolicyLogLikelihood``)."""
    score = scorer.logit if isinstance(scorer, RewardNet) else scorer
    parts = [score(state[i:i + CHUNK], action[i:i + CHUNK]).double().cpu().numpy()
             for i in range(0, state.shape[0], CHUNK)]
    return np.concatenate(parts) if parts else np.empty(0)


def rank_among(score: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The rank of each ``score`` among the sorted ``reference`` values, in [0, 1]: the i-th
    smallest of n sits at (i + 1/2)/n, linear between two of them, 0 below the least and 1
    above the greatest. On the scores' device, in the reference's dtype."""
    n = reference.numel()
    score = score.to(reference.dtype)
    above = torch.searchsorted(reference, score, right=True)  # how many reference values are <= score
    lo, hi = (above - 1).clamp(0, n - 1), above.clamp(0, n - 1)
    x0, x1 = reference[lo], reference[hi]
    share = torch.where(x1 > x0, (score - x0) / (x1 - x0).clamp_min(torch.finfo(reference.dtype).tiny), 0.0)
    ranks = (lo + 0.5 + share * (hi - lo)) / n
    return torch.where(score < reference[0], 0.0, torch.where(score > reference[-1], 1.0, ranks))


class RankedReward:
    """``r'(s, a)``: the share of D's pairs that a scorer ranks below ``(s, a)``.

    The scorer is a ``RewardNet`` (ranked by its output before the bound) or any module
    with ``forward(state, action) -> (B,)`` and ``batch(state, action)`` (``SoftAdvantage``,
    ``PolicyLogLikelihood``).

    Build it with :meth:`fit` on D's observations and actions (or :meth:`from_checkpoint`
    with a Minari dataset id); ``predict(state, action, next_state=None, done=None)`` has
    imitation's signature, for :class:`~bicql_lightning.LearnedRewardWrapper`.
    """

    def __init__(self, reward_net: Any, reference: np.ndarray):
        reference = np.sort(np.asarray(reference, dtype=np.float64).ravel())
        if reference.size < 2 or not np.isfinite(reference).all():
            raise ValueError(f"RankedReward needs at least 2 finite reference logits (got {reference.size}, "
                             f"{int((~np.isfinite(reference)).sum())} not finite): fit it on D's pairs.")
        self.reward_net = reward_net.eval()
        self.reference = reference

    @classmethod
    @torch.no_grad()
    def fit(cls, reward_net: Any, observations: np.ndarray, actions: np.ndarray) -> RankedReward:
        """Rank against the pairs ``(observations[i], actions[i])`` of D."""
        observations, actions = np.asarray(observations), np.asarray(actions)
        if len(observations) != len(actions):
            raise ValueError(f"RankedReward.fit: {len(observations)} observations but {len(actions)} actions; "
                             "pass D's pairs, one action per observation.")
        device = next(reward_net.parameters()).device
        return cls(reward_net, pair_scores(reward_net, torch.as_tensor(observations, device=device),
                                           torch.as_tensor(actions, device=device)))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, dataset_id: str | list[str],
                        score: str = "reward") -> RankedReward:
        """A ``BiCQLML`` checkpoint's reward (``score="reward"``), soft advantage
        (``score="soft_advantage"``) or controller's log-likelihood (``score="log_likelihood"``;
        ``"relative_log_likelihood"``, less that of the controller's greedy action), ranked
        against the pairs of Minari dataset(s) D."""
        from .datasets import load_transitions
        from .shaping import PolicyLogLikelihood, SoftAdvantage

        scorers = {"reward": RewardNet.from_checkpoint, "soft_advantage": SoftAdvantage.from_checkpoint,
                   "log_likelihood": PolicyLogLikelihood.from_checkpoint,
                   "relative_log_likelihood": lambda p: PolicyLogLikelihood.from_checkpoint(p, relative=True)}
        if score not in scorers:
            raise ValueError(f"RankedReward.from_checkpoint: score={score!r}; use one of "
                             f"{', '.join(map(repr, scorers))}.")
        scorer = scorers[score](path)
        data = load_transitions(dataset_id)
        return cls.fit(scorer, data.observations, data.actions)

    @torch.no_grad()
    def predict(self, state: Any, action: Any, next_state: Any = None, done: Any = None) -> np.ndarray:
        state_t, action_t, single = self.reward_net.batch(state, action)
        logit = pair_scores(self.reward_net, state_t, action_t)
        ranks = rank_among(torch.from_numpy(logit), torch.from_numpy(self.reference)).numpy()
        return ranks[0] if single else ranks
