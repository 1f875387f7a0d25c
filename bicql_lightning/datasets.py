"""Minari dataset tools: deterministic collection, robust loading, flat transitions."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import sys
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import gymnasium as gym
import minari
import numpy as np
from filelock import FileLock
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.namespace import create_namespace, list_local_namespaces
from minari.storage.datasets_root_dir import get_dataset_path
from tqdm.auto import tqdm

from .experts import BUILTIN_EXPERTS, MLPExpert, Policy, RolloutError, epsilon_random, random_policy, rollout

EnvLike = Union[str, gym.Env]
REF_EVAL_SEEDS = tuple(range(10000, 10010))


class DatasetError(ValueError):
    """A user-facing problem with a dataset (missing, malformed, inconsistent)."""


def _check_id(dataset_id: str) -> Optional[str]:
    """Validate the id syntax up front and return its namespace."""
    try:
        return parse_dataset_id(dataset_id)[0]
    except ValueError as e:
        raise DatasetError(f"invalid dataset id {dataset_id!r}: {e}") from None


def _make_env(env: EnvLike, env_kwargs: Optional[dict], max_episode_steps: Optional[int]) -> Tuple[gym.Env, bool]:
    """Return (env, owned): envs we build here must also be closed here."""
    if isinstance(env, gym.Env):
        if env_kwargs or max_episode_steps is not None:
            raise DatasetError("env_kwargs / max_episode_steps only apply when env is an id string")
        return env, False
    extra = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    return gym.make(env, **extra, **(env_kwargs or {})), True


def evaluate_policy(env: EnvLike, policy: Policy, seeds: Sequence[int], env_kwargs: Optional[dict] = None,
                    max_episode_steps: Optional[int] = None) -> np.ndarray:
    """Undiscounted return of one episode per seed (env and policy rng both seeded)."""
    gym_env, owned = _make_env(env, env_kwargs, max_episode_steps)
    try:
        return np.array([sum(rollout(gym_env, policy, s, f"seed {s}")["rewards"]) for s in seeds], dtype=np.float64)
    except RolloutError as e:
        raise DatasetError(str(e)) from None
    finally:
        if owned:
            gym_env.close()


@contextlib.contextmanager
def _minari_root_override(path: Path) -> Iterator[None]:
    """Point Minari at a private root; minari re-reads the env var on every call."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _exists_error(dataset_id: str) -> DatasetError:
    return DatasetError(f"dataset {dataset_id!r} already exists at {get_dataset_path(dataset_id)}; pass overwrite=True "
                        f"(--overwrite on the command line) to replace it, or choose another dataset id")


def collect_dataset(dataset_id: str, env: EnvLike, policy: Union[Policy, Sequence[Policy]], num_episodes: int, *,
                    seed: int = 0, episode_seeds: Optional[Sequence[int]] = None, env_kwargs: Optional[dict] = None,
                    max_episode_steps: Optional[int] = None, ref_min_score: Optional[float] = None,
                    ref_max_score: Optional[float] = None, description: Optional[str] = None, overwrite: bool = False,
                    progress: bool = True, author: str = "bicql-lightning") -> minari.MinariDataset:
    """Roll out ``policy`` for ``num_episodes`` episodes and save them as a local Minari dataset.

    Episode ``k`` resets the env with ``episode_seeds[k]`` (default ``seed + k``) and
    gives the policy ``np.random.default_rng(episode_seeds[k])``. ``policy`` may be a
    sequence with one policy per episode. The dataset is written into a hidden
    staging root and moved into place afterwards, so an interrupted run never leaves
    a half-written dataset and never destroys the one being overwritten.
    """
    namespace = _check_id(dataset_id)
    if num_episodes < 1:
        raise DatasetError(f"num_episodes must be >= 1, got {num_episodes}")
    seeds = [seed + k for k in range(num_episodes)] if episode_seeds is None else [int(s) for s in episode_seeds]
    policies = list(policy) if isinstance(policy, Sequence) else [policy] * num_episodes
    if len(seeds) != num_episodes or len(policies) != num_episodes:
        raise DatasetError(f"got {len(seeds)} episode seeds and {len(policies)} policies for {num_episodes} episodes")
    target = get_dataset_path(dataset_id)
    if target.exists() and not overwrite:
        raise _exists_error(dataset_id)
    gym_env, owned = _make_env(env, env_kwargs, max_episode_steps)
    try:
        buffers = []
        for k in tqdm(range(num_episodes), desc=f"collect {dataset_id}", disable=not progress, unit="ep"):
            try:
                ep = rollout(gym_env, policies[k], seeds[k], f"episode {k} (seed {seeds[k]})")
            except RolloutError as e:
                raise DatasetError(f"cannot collect {dataset_id!r}: {e}") from None
            buffers.append(EpisodeBuffer(id=k, seed=seeds[k], infos={}, **ep))
        if ref_max_score is not None and ref_min_score is None:
            # Minari would otherwise roll out 100 random episodes with an unseeded policy.
            ref_min_score = float(evaluate_policy(gym_env, random_policy(gym_env.action_space), REF_EVAL_SEEDS).mean())
        root = get_dataset_path()
        staging = root / f".bicql-staging-{uuid.uuid4().hex}"
        try:
            with _minari_root_override(staging), warnings.catch_warnings():
                # Minari nags about optional metadata (code_permalink, email, ...).
                warnings.filterwarnings("ignore", category=UserWarning, module=r"minari\.")
                minari.create_dataset_from_buffers(
                    dataset_id, buffers, env=gym_env.spec, observation_space=gym_env.observation_space,
                    action_space=gym_env.action_space, algorithm_name="bicql-lightning collect_dataset",
                    author=author, description=description or f"{num_episodes} episodes collected by bicql-lightning",
                    data_format="hdf5", ref_min_score=ref_min_score if ref_max_score is not None else None,
                    ref_max_score=ref_max_score)
            if namespace is not None and namespace not in list_local_namespaces():
                with contextlib.suppress(ValueError):  # another process created it first
                    create_namespace(namespace)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                if not overwrite:  # appeared while we were collecting
                    raise _exists_error(dataset_id)
                trash = root / f".bicql-trash-{uuid.uuid4().hex}"
                target.rename(trash)
                (staging / dataset_id).rename(target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                (staging / dataset_id).rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if owned:
            gym_env.close()
    return minari.load_dataset(dataset_id)


def _probe_remote(timeout: float = 5.0) -> None:
    """Fail fast offline: minari's hub client retries for ~25 s before giving up."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a direct connection test says nothing behind a proxy
    gcp = os.environ.get("MINARI_REMOTE", "hf://").startswith("gcp://")
    url = "https://storage.googleapis.com" if gcp else os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = url.split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"network unreachable: cannot connect to {host}:443 ({e})") from None


def load_minari(dataset_id: str, download: bool = True) -> minari.MinariDataset:
    """Load a local Minari dataset, downloading it first if allowed and missing."""
    _check_id(dataset_id)
    path = get_dataset_path(dataset_id)
    if (path / "data").is_dir():
        try:
            return minari.load_dataset(dataset_id)
        except Exception as e:
            raise DatasetError(f"local dataset {dataset_id!r} at {path} could not be read: {e}") from e
    reason = "download=False"
    if download:
        try:
            _probe_remote()
            minari.download_dataset(dataset_id)
            return minari.load_dataset(dataset_id)
        except Exception as e:
            reason = f"download failed: {type(e).__name__}: {e}"
    raise DatasetError(
        f"Minari dataset {dataset_id!r} is not in the local Minari root {get_dataset_path()} "
        f"(set MINARI_DATASETS_PATH to change it) and could not be fetched ({reason}). "
        f"Check the dataset id, connect to the network, or create a local dataset with "
        f"`bicql dataset --env ENV --dataset-id {dataset_id} ...` or bicql_lightning.datasets.collect_dataset().")


@dataclass
class Transitions:
    """Flat transitions of one or more Minari datasets, concatenated in order.

    Box observations/actions are float32, Discrete ones int64 ``(N,)``; rewards are
    float32. ``episode_ids`` number episodes over the concatenation and
    ``episode_starts`` (bool) marks the first transition of each episode.
    Reference scores are set only when every dataset stores the same ones.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminations: np.ndarray
    truncations: np.ndarray
    episode_ids: np.ndarray
    episode_starts: np.ndarray
    observation_space: gym.Space
    action_space: gym.Space
    num_episodes: int
    env_spec: Optional[gym.envs.registration.EnvSpec] = None
    ref_min_score: Optional[float] = None
    ref_max_score: Optional[float] = None
    dataset_ids: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


def _array_spec(space: gym.Space, what: str, dataset_id: str) -> Tuple[Tuple[int, ...], type]:
    if isinstance(space, gym.spaces.Box):
        return tuple(space.shape), np.float32
    if isinstance(space, gym.spaces.Discrete):
        return (), np.int64
    raise DatasetError(f"dataset {dataset_id!r}: {what} space {space} is not supported (only Box and Discrete)")


def load_transitions(dataset_ids: Union[str, Sequence[str]], num_episodes: Optional[int] = None,
                     download: bool = True) -> Transitions:
    """Load datasets and flatten their first ``num_episodes`` episodes into transitions."""
    ids = [dataset_ids] if isinstance(dataset_ids, str) else list(dataset_ids)
    if not ids:
        raise DatasetError("no dataset id given")
    datasets = [load_minari(i, download=download) for i in ids]
    first = datasets[0]
    for i, d in zip(ids[1:], datasets[1:]):
        if d.observation_space != first.observation_space or d.action_space != first.action_space:
            raise DatasetError(f"cannot combine {ids[0]!r} (observations {first.observation_space}, actions "
                               f"{first.action_space}) with {i!r} (observations {d.observation_space}, actions {d.action_space})")
    obs_shape, obs_dtype = _array_spec(first.observation_space, "observation", ids[0])
    act_shape, act_dtype = _array_spec(first.action_space, "action", ids[0])
    available = sum(d.total_episodes for d in datasets)
    wanted = available if num_episodes is None else int(num_episodes)
    if wanted < 1 or wanted > available:
        raise DatasetError(f"asked for {wanted} episodes but {ids} hold {available} episodes in total")
    plan, left = [], wanted  # (dataset, its first n episode indices) in concatenation order
    for d in datasets:
        take = min(left, d.total_episodes)
        plan.append((d, d.episode_indices[:take]))
        left -= take
    n = sum(int(m["total_steps"]) for d, idx in plan for m in d.storage.get_episode_metadata(idx))
    if n == 0:
        raise DatasetError(f"datasets {ids} contain no transitions")
    out = dict(observations=np.empty((n, *obs_shape), obs_dtype), next_observations=np.empty((n, *obs_shape), obs_dtype),
               actions=np.empty((n, *act_shape), act_dtype), rewards=np.empty(n, np.float32),
               terminations=np.empty(n, bool), truncations=np.empty(n, bool),
               episode_ids=np.empty(n, np.int64), episode_starts=np.zeros(n, bool))
    pos = ep_no = 0
    for d, idx in plan:
        start = pos
        for ep in d.iterate_episodes(idx):
            t = len(ep.rewards)
            obs = np.asarray(ep.observations)
            if len(obs) != t + 1 or len(ep.actions) != t:
                raise DatasetError(f"dataset {d.id!r} episode {ep.id}: {len(obs)} observations and {len(ep.actions)} "
                                   f"actions for {t} rewards (expected T+1 and T)")
            if pos + t > n:
                raise DatasetError(f"dataset {d.id!r}: episode lengths disagree with its metadata (total_steps)")
            s = slice(pos, pos + t)
            out["observations"][s], out["next_observations"][s] = obs[:-1], obs[1:]
            out["actions"][s], out["rewards"][s] = np.asarray(ep.actions).reshape(t, *act_shape), ep.rewards
            out["terminations"][s], out["truncations"][s] = ep.terminations, ep.truncations
            out["episode_ids"][s] = ep_no
            if t:
                out["episode_starts"][pos] = True
            pos, ep_no = pos + t, ep_no + 1
        for key in ("observations", "next_observations", "actions", "rewards"):
            bad = int(np.size(out[key][start:pos]) - np.isfinite(out[key][start:pos]).sum())
            if bad:
                raise DatasetError(f"dataset {d.id!r}: field {key!r} has {bad} non-finite values (NaN/inf)")
    if pos != n:
        raise DatasetError(f"datasets {ids}: found {pos} transitions but the metadata promised {n}")
    refs = {(d.storage.metadata.get("ref_min_score"), d.storage.metadata.get("ref_max_score")) for d, _ in plan}
    ref_min, ref_max = refs.pop() if len(refs) == 1 else (None, None)
    return Transitions(**out, observation_space=first.observation_space, action_space=first.action_space,
                       num_episodes=wanted, env_spec=first.env_spec, dataset_ids=ids,
                       ref_min_score=None if ref_min is None else float(ref_min),
                       ref_max_score=None if ref_max is None else float(ref_max))


def _quickstart_present(dataset_id: str, episodes: int) -> bool:
    """True if a valid quickstart dataset exists; anything else under the id is never touched."""
    path = get_dataset_path(dataset_id)
    if not (path / "data").is_dir():
        return False
    try:
        meta = minari.load_dataset(dataset_id).storage.metadata
        reason = "" if meta.get("total_episodes") == episodes and "ref_max_score" in meta else "unexpected content"
    except Exception as e:
        reason = f"unreadable: {e}"
    if reason:
        raise DatasetError(f"{dataset_id!r} at {path} is not a bicql quickstart dataset ({episodes} episodes with "
                           f"reference scores; {reason}); delete or move it so it can be recreated")
    return True


def ensure_quickstart_datasets(env_id: str = "CartPole-v1", progress: bool = False) -> Dict[str, str]:
    """Create (once) the expert and mixed-quality datasets of a built-in environment.

    Returns ``{"expert": id, "offline": id}``. Creation is guarded by a file lock in
    the Minari root so concurrent processes (e.g. DDP ranks) do not race.
    """
    if env_id not in BUILTIN_EXPERTS:
        raise DatasetError(f"no built-in expert for {env_id!r}; available: {sorted(BUILTIN_EXPERTS)}")
    name = env_id.split("-v")[0].lower()
    ids = {"expert": f"bicql/{name}/expert-v0", "offline": f"bicql/{name}/mixed-v0"}
    expert = BUILTIN_EXPERTS[env_id]
    with FileLock(str(get_dataset_path() / f".bicql-quickstart-{name}.lock")):
        need_expert = not _quickstart_present(ids["expert"], 10)
        need_mixed = not _quickstart_present(ids["offline"], 50)
        if need_expert or need_mixed:
            env = gym.make(env_id)
            refs = dict(ref_max_score=float(evaluate_policy(env, expert, REF_EVAL_SEEDS).mean()),
                        ref_min_score=float(evaluate_policy(env, random_policy(env.action_space), REF_EVAL_SEEDS).mean()))
            if need_expert:
                collect_dataset(ids["expert"], env_id, expert, 10, seed=0, progress=progress,
                                description=f"10 episodes of the built-in {env_id} expert", **refs)
            if need_mixed:
                mixed = [epsilon_random(expert, i / 49, env.action_space) for i in range(50)]
                collect_dataset(ids["offline"], env_id, mixed, 50, seed=1000, progress=progress,
                                description=f"50 {env_id} episodes; episode i acts randomly with probability i/49", **refs)
            env.close()
    return ids


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``bicql dataset``: collect a Minari dataset from a built-in, random or npz policy."""
    p = argparse.ArgumentParser(prog="bicql dataset", description=main.__doc__)
    p.add_argument("--env", required=True, help="gymnasium environment id, e.g. CartPole-v1")
    p.add_argument("--policy", default="builtin", help="builtin | random | npz:PATH")
    p.add_argument("--dataset-id", required=True, help="Minari id, e.g. bicql/cartpole/expert-v0")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="episode k uses seed + k")
    p.add_argument("--epsilon", type=float, default=0.0, help="probability of a random action per step")
    p.add_argument("--noise", type=float, default=0.0, help="Gaussian noise scale of npz experts")
    p.add_argument("--max-episode-steps", type=int, default=None)
    p.add_argument("--ref-min-score", type=float, default=None)
    p.add_argument("--ref-max-score", type=float, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        space = gym.make(a.env).action_space
        if a.policy == "builtin":
            if a.env not in BUILTIN_EXPERTS:
                raise DatasetError(f"no built-in expert for {a.env}; use --policy random or npz:PATH")
            policy = BUILTIN_EXPERTS[a.env]
        elif a.policy == "random":
            policy = random_policy(space)
        elif a.policy.startswith("npz:"):
            low, high = (space.low, space.high) if isinstance(space, gym.spaces.Box) else (None, None)
            policy = MLPExpert.from_npz(a.policy[4:], noise=a.noise, action_low=low, action_high=high)
        else:
            raise DatasetError(f"unknown --policy {a.policy!r}; use builtin, random or npz:PATH")
        if a.epsilon > 0:
            policy = epsilon_random(policy, a.epsilon, space)
        ds = collect_dataset(a.dataset_id, a.env, policy, a.episodes, seed=a.seed, max_episode_steps=a.max_episode_steps,
                             ref_min_score=a.ref_min_score, ref_max_score=a.ref_max_score, overwrite=a.overwrite,
                             progress=not a.no_progress)
    except (ValueError, OSError, gym.error.Error) as e:  # DatasetError, bad --epsilon, unknown env, missing file
        print(f"error: {e}", file=sys.stderr)
        return 1
    returns = [float(np.sum(ep.rewards)) for ep in ds.iterate_episodes()]
    print(f"wrote {ds.id} to {get_dataset_path(ds.id)}: {ds.total_episodes} episodes, {ds.total_steps} transitions, "
          f"mean return {np.mean(returns):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
