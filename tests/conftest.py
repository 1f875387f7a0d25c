"""Shared fixtures: tiny local Minari datasets of CartPole-v1 and Pendulum-v1.

The datasets are made once per test session with ``collect_dataset`` and the built-in
experts, in a private Minari root (never ``~/.minari``). Episodes are capped at 60
(CartPole) and 50 (Pendulum) steps, so every dataset holds a few hundred transitions
and a rollout evaluation takes milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import pytest

from bicql_lightning.datasets import REF_EVAL_SEEDS, collect_dataset, evaluate_policy
from bicql_lightning.experts import BUILTIN_EXPERTS, epsilon_random, random_policy

CARTPOLE_STEPS = 60
PENDULUM_STEPS = 50


@dataclass(frozen=True)
class TinyData:
    """Ids of the tiny datasets and the Minari root that holds them."""

    root: Path
    cartpole_expert: str = "tiny/cartpole/expert-v0"  # 3 expert episodes, seeds 0..2
    cartpole_mixed: str = "tiny/cartpole/mixed-v0"  # 4 episodes, episode i random w.p. i/3
    pendulum_expert: str = "tiny/pendulum/expert-v0"  # 2 expert episodes, seeds 0..1
    pendulum_mixed: str = "tiny/pendulum/mixed-v0"  # 3 random episodes

    def ids(self, env: str) -> tuple[str, str]:
        """``(expert, offline)`` ids of ``"cartpole"`` or ``"pendulum"``."""
        return getattr(self, f"{env}_expert"), getattr(self, f"{env}_mixed")


def _collect_tiny(data: TinyData) -> None:
    cartpole = BUILTIN_EXPERTS["CartPole-v1"]
    pendulum = BUILTIN_EXPERTS["Pendulum-v1"]
    cp_space = gym.make("CartPole-v1").action_space
    pe_space = gym.make("Pendulum-v1").action_space
    # Reference returns of the expert under the same step cap; the random reference is
    # filled in by collect_dataset (random actions on seeds 10000..10009).
    cp_ref = float(evaluate_policy("CartPole-v1", cartpole, REF_EVAL_SEEDS, max_episode_steps=CARTPOLE_STEPS).mean())
    pe_ref = float(evaluate_policy("Pendulum-v1", pendulum, REF_EVAL_SEEDS, max_episode_steps=PENDULUM_STEPS).mean())
    collect_dataset(data.cartpole_expert, "CartPole-v1", cartpole, 3, seed=0, max_episode_steps=CARTPOLE_STEPS,
                    ref_max_score=cp_ref, progress=False)
    collect_dataset(data.cartpole_mixed, "CartPole-v1", [epsilon_random(cartpole, i / 3, cp_space) for i in range(4)],
                    4, seed=100, max_episode_steps=CARTPOLE_STEPS, ref_max_score=cp_ref, progress=False)
    collect_dataset(data.pendulum_expert, "Pendulum-v1", pendulum, 2, seed=0, max_episode_steps=PENDULUM_STEPS,
                    ref_max_score=pe_ref, progress=False)
    collect_dataset(data.pendulum_mixed, "Pendulum-v1", random_policy(pe_space), 3, seed=100,
                    max_episode_steps=PENDULUM_STEPS, ref_max_score=pe_ref, progress=False)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    """The tiny datasets, made once. Point MINARI_DATASETS_PATH at ``.root`` to read them
    (the ``tiny`` fixture does that for one test)."""
    data = TinyData(root=tmp_path_factory.mktemp("tiny_minari"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(data.root))
        _collect_tiny(data)
    return data


@pytest.fixture
def tiny(tiny_data: TinyData, monkeypatch: pytest.MonkeyPatch) -> TinyData:
    """The tiny datasets, with MINARI_DATASETS_PATH pointing at their root for this test."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tiny_data.root))
    return tiny_data


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests' networks are tiny: with two intra-op threads on a busy 2-core machine
    each small op waits tens of milliseconds for the other thread, so run on one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bicql(args, env=None, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    """The ``bicql`` command as a user runs it, in a new process (its output captured)."""
    script = Path(sys.executable).with_name("bicql")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "bicql_lightning.cli"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd + list(args), env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
