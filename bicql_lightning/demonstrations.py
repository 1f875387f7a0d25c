"""Subsampled demonstrations: every k-th transition of each expert episode, kept whole.

The GAIL / DAC / ValueDICE protocol (and benchmark version 2's ``sub20``): of each episode
only the transitions at t = 0, k, 2k, ... are kept, each whole (s_t, a_t, r_t, s_{t+1},
terminated_t, truncated_t); the others are used nowhere. Behaviour cloning then sees about
T/k pairs per episode, and the states in between are for the offline data to cover.

A kept transition is stored as a segment of its own (its two observations), so the
storage rule of :class:`~bicql_lightning.Transitions` (transition t of segment j is row
t + j) still holds; ``episode_numbers`` keeps the episode it came from.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .datasets import DatasetError, Transitions


def episode_numbers(t: Transitions) -> np.ndarray:
    """The episode each transition came from, ``(N,)`` int."""
    return t.episode_ids if t.episode_numbers is None else t.episode_numbers


def subsample(t: Transitions, every: int) -> Transitions:
    """The transitions at steps 0, ``every``, 2·``every``, ... of each episode of ``t``."""
    if every < 1:
        raise DatasetError(f"expert_subsample must be at least 1 (1 keeps every transition), got {every}")
    if every == 1:
        return t
    starts = np.flatnonzero(t.episode_starts)
    # Step of each transition within its episode: its index minus its episode's first index.
    first = starts[np.searchsorted(starts, np.arange(len(t)), side="right") - 1]
    keep = np.flatnonzero((np.arange(len(t)) - first) % every == 0)
    rows = t.obs_rows[keep]
    obs = np.stack([t.episode_observations[rows], t.episode_observations[rows + 1]], 1)
    return replace(t, episode_observations=obs.reshape(2 * len(keep), *obs.shape[2:]), actions=t.actions[keep],
                   rewards=t.rewards[keep], terminations=t.terminations[keep], truncations=t.truncations[keep],
                   episode_ids=np.arange(len(keep), dtype=np.int32), episode_starts=np.ones(len(keep), bool),
                   episode_numbers=episode_numbers(t)[keep].astype(np.int32))


def concatenate(a: Transitions, b: Transitions) -> Transitions:
    """``a``'s transitions, then ``b``'s (episodes renumbered after ``a``'s); same spaces."""
    if a.observation_space != b.observation_space or a.action_space != b.action_space:
        raise DatasetError(f"cannot combine {a.dataset_ids} with {b.dataset_ids}: their spaces differ")
    segments_a = len(a.episode_observations) - len(a)  # one more observation than transitions per segment
    numbers_a = episode_numbers(a)
    refs = (a.ref_min_score, a.ref_max_score) if (a.ref_min_score, a.ref_max_score) == (
        b.ref_min_score, b.ref_max_score) else (None, None)
    numbers = None
    if a.episode_numbers is not None or b.episode_numbers is not None:
        numbers = np.concatenate([numbers_a, episode_numbers(b) + (int(numbers_a.max()) + 1 if len(a) else 0)])
    return replace(a, episode_observations=np.concatenate([a.episode_observations, b.episode_observations]),
                   actions=np.concatenate([a.actions, b.actions]), rewards=np.concatenate([a.rewards, b.rewards]),
                   terminations=np.concatenate([a.terminations, b.terminations]),
                   truncations=np.concatenate([a.truncations, b.truncations]),
                   episode_ids=np.concatenate([a.episode_ids, b.episode_ids + segments_a]).astype(np.int32),
                   episode_starts=np.concatenate([a.episode_starts, b.episode_starts]),
                   num_episodes=a.num_episodes + b.num_episodes, dataset_ids=[*a.dataset_ids, *b.dataset_ids],
                   ref_min_score=refs[0], ref_max_score=refs[1], episode_numbers=numbers)
