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
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

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
    """Validate the id syntax up front (before any rollout) and return its namespace."""
    try:
        return parse_dataset_id(dataset_id)[0]
    except ValueError as e:
        raise DatasetError(f"invalid dataset id {dataset_id!r}: {e}") from None


def _make_env(env: EnvLike, env_kwargs: Optional[dict], max_steps: Optional[int]) -> Tuple[gym.Env, bool]:
    """Return ``(env, owned)``: only envs built here may be closed here."""
    if isinstance(env, gym.Env):
        if env_kwargs or max_steps is not None:
            raise DatasetError("env_kwargs / max_episode_steps only apply when env is an id string")
        return env, False
    extra = {} if max_steps is None else {"max_episode_steps": max_steps}
    return gym.make(env, **extra, **(env_kwargs or {})), True


def evaluate_policy(env: EnvLike, policy: Policy, seeds: Sequence[int], env_kwargs: Optional[dict] = None,
                    max_episode_steps: Optional[int] = None) -> np.ndarray:
    """Undiscounted return of one episode per seed (env and policy rng both seeded)."""
    gym_env, owned = _make_env(env, env_kwargs, max_episode_steps)
    try:
        returns = [sum(rollout(gym_env, policy, s, f"seed {s}")["rewards"]) for s in seeds]
    except RolloutError as e:
        raise DatasetError(str(e)) from None
    finally:
        if owned:
            gym_env.close()
    return np.array(returns, dtype=np.float64)


@contextlib.contextmanager
def _minari_root(path: Path) -> Iterator[None]:
    """Point Minari at another root; it re-reads MINARI_DATASETS_PATH on every call."""
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
    return DatasetError(f"dataset {dataset_id!r} already exists at {get_dataset_path(dataset_id)}; pass "
                        "overwrite=True (--overwrite on the command line) to replace it, or choose another id")


def _write_atomically(dataset_id: str, overwrite: bool, write: Callable[[], object]) -> None:
    """Run ``write`` against a hidden staging root, then move the result into place.

    A crash mid-write leaves only a hidden staging folder (Minari skips dot-folders)
    and the dataset being replaced is removed only after the new one is complete.
    """
    root, target = get_dataset_path(), get_dataset_path(dataset_id)
    staging = root / f".bicql-staging-{uuid.uuid4().hex}"
    try:
        with _minari_root(staging):
            write()
        namespace = parse_dataset_id(dataset_id)[0]
        if namespace is not None and namespace not in list_local_namespaces():
            with contextlib.suppress(ValueError):  # another process created it just now
                create_namespace(namespace)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            (staging / dataset_id).rename(target)
        elif not overwrite:  # appeared while we were collecting
            raise _exists_error(dataset_id)
        else:
            trash = root / f".bicql-trash-{uuid.uuid4().hex}"
            target.rename(trash)
            (staging / dataset_id).rename(target)
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def collect_dataset(dataset_id: str, env: EnvLike, policy: Union[Policy, Sequence[Policy]], num_episodes: int,
                    *, seed: int = 0, episode_seeds: Optional[Sequence[int]] = None,
                    env_kwargs: Optional[dict] = None, max_episode_steps: Optional[int] = None,
                    ref_min_score: Optional[float] = None, ref_max_score: Optional[float] = None,
                    description: Optional[str] = None, overwrite: bool = False, progress: bool = True,
                    author: str = "bicql-lightning") -> minari.MinariDataset:
    """Roll out ``policy`` for ``num_episodes`` episodes and save them as a local Minari dataset.

    Episode ``k`` resets the env with ``episode_seeds[k]`` (default ``seed + k``) and gives
    the policy a generator seeded from ``episode_seeds[k]`` (a child of its ``SeedSequence``,
    independent of the environment's own stream), so the data is a pure function
    of the seeds. ``policy`` may also be a sequence holding one policy per episode.
    ``ref_min_score`` defaults to the mean return of random actions on seeds 10000..10009
    when only ``ref_max_score`` is given. Raises :class:`DatasetError` if the id exists and
    ``overwrite`` is False, or on invalid actions / non-finite observations.
    """
    _check_id(dataset_id)
    if num_episodes < 1:
        raise DatasetError(f"num_episodes must be >= 1, got {num_episodes}")
    seeds = list(range(seed, seed + num_episodes)) if episode_seeds is None else [int(s) for s in episode_seeds]
    policies = list(policy) if isinstance(policy, Sequence) else [policy] * num_episodes
    if len(seeds) != num_episodes or len(policies) != num_episodes:
        raise DatasetError(f"got {len(seeds)} seeds and {len(policies)} policies for {num_episodes} episodes")
    if ref_min_score is not None and ref_max_score is None:
        raise DatasetError("ref_min_score needs ref_max_score (Minari stores the two together)")
    if get_dataset_path(dataset_id).exists() and not overwrite:
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
            # Minari would otherwise roll out 100 episodes of an unseeded random policy.
            random_returns = evaluate_policy(gym_env, random_policy(gym_env.action_space), REF_EVAL_SEEDS)
            ref_min_score = float(random_returns.mean())

        def write() -> None:
            with warnings.catch_warnings():  # Minari nags about optional metadata (permalink, email)
                warnings.filterwarnings("ignore", category=UserWarning, module=r"minari\.")
                minari.create_dataset_from_buffers(
                    dataset_id, buffers, env=gym_env.spec, observation_space=gym_env.observation_space,
                    action_space=gym_env.action_space, algorithm_name="bicql-lightning collect_dataset",
                    author=author, description=description or f"{num_episodes} episodes by bicql-lightning",
                    data_format="hdf5", ref_min_score=ref_min_score, ref_max_score=ref_max_score)

        _write_atomically(dataset_id, overwrite, write)
    finally:
        if owned:
            gym_env.close()
    return minari.load_dataset(dataset_id)


def _probe_remote(timeout: float = 5.0) -> None:
    """Fail fast offline: Minari's hub client retries for ~25 s before giving up."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a direct connection test says nothing behind a proxy
    gcp = os.environ.get("MINARI_REMOTE", "hf://").startswith("gcp://")
    url = "https://storage.googleapis.com" if gcp else os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = url.split("://")[-1].split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"network unreachable: cannot connect to {host}:443 ({e})") from None


def load_minari(dataset_id: str, download: bool = True) -> minari.MinariDataset:
    """Load a local Minari dataset, downloading it first if it is missing and ``download``."""
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
        f"Minari dataset {dataset_id!r} is not in the local Minari root {get_dataset_path()} (set "
        f"MINARI_DATASETS_PATH to use another) and could not be fetched ({reason}). Check the dataset id, "
        f"connect to the network, or create it locally with `bicql dataset --env ENV --dataset-id "
        f"{dataset_id} ...` or bicql_lightning.datasets.collect_dataset().")


@dataclass
class Transitions:
    """Flat transitions of one or more Minari datasets, concatenated in order.

    Observations are stored once, as Minari stores them: ``episode_observations`` holds
    every episode's T + 1 observations back to back, so transition ``t`` of episode ``k``
    (counted from 0 over the concatenation) goes from row ``t + k`` to row ``t + k + 1``
    (``obs_rows``). A separate next-observation array would
    nearly double the memory of large datasets. ``observations`` and
    ``next_observations`` give the familiar per-transition arrays (as copies).

    Box observations/actions are float32, Discrete ones int64 of shape ``(N,)``; rewards
    are float32. ``episode_ids`` (int32) number episodes over the concatenation and the
    bool ``episode_starts`` marks each episode's first transition. Reference scores are
    set only when every dataset used stores the same ones.
    """

    episode_observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
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
    # The episode each transition came from, where ``episode_ids`` number segments instead
    # (subsampled demonstrations: bicql_lightning.demonstrations); ``None``: ``episode_ids``.
    episode_numbers: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def obs_rows(self) -> np.ndarray:
        """Row of each transition's observation in ``episode_observations``, ``(N,)``."""
        return np.arange(len(self)) + self.episode_ids

    @property
    def observations(self) -> np.ndarray:
        """Each transition's observation, ``(N, ...)`` (a copy)."""
        return self.episode_observations[self.obs_rows]

    @property
    def next_observations(self) -> np.ndarray:
        """Each transition's next observation, ``(N, ...)`` (a copy)."""
        return self.episode_observations[self.obs_rows + 1]

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays."""
        return sum(a.nbytes for a in (self.episode_observations, self.actions, self.rewards,
                                      self.terminations, self.truncations, self.episode_ids, self.episode_starts))


def _array_spec(space: gym.Space, what: str, dataset_id: str) -> Tuple[Tuple[int, ...], type]:
    if isinstance(space, gym.spaces.Box):
        return tuple(space.shape), np.float32
    if isinstance(space, gym.spaces.Discrete):
        return (), np.int64
    raise DatasetError(f"dataset {dataset_id!r}: {what} space {space} is not supported (only Box, Discrete)")


def _episode_plan(ids: List[str], num_episodes: Optional[int], datasets: list) -> list:
    """(dataset, episode indices) covering the first ``num_episodes`` episodes of ``ids``."""
    available = sum(d.total_episodes for d in datasets)
    if available == 0:
        raise DatasetError(f"{ids} hold no episodes: record some (`bicql dataset ... --overwrite`) or use "
                           "another dataset")
    wanted = available if num_episodes is None else int(num_episodes)
    if wanted < 1:
        raise DatasetError(f"asked for {wanted} episodes of {ids}: ask for at least 1, or null for all {available}")
    if wanted > available:
        raise DatasetError(f"asked for {wanted} episodes but {ids} hold {available} episodes in total: ask for at "
                           f"most {available}, or null for all of them")
    plan, left = [], wanted
    for d in datasets:
        plan.append((d, d.episode_indices[: min(left, d.total_episodes)]))
        left -= len(plan[-1][1])
    return plan


def _episodes(dataset: minari.MinariDataset, indices: Sequence[int]) -> Iterator[tuple]:
    """Per episode: ``(id, (rewards, terminations, truncations), #observations, #actions,
    read)``, where ``read(obs_out, actions_out)`` writes the observations and actions into
    the given array slices.

    Minari's HDF5 files are read straight into the slices (``read_direct``): going through
    ``iterate_episodes`` makes a temporary copy of every episode, which left the loading
    of 2M Hopper transitions with 77 MB of fragmented heap on top of the 143 MB of arrays.
    Other storages go through ``iterate_episodes``.
    """
    path = getattr(dataset.storage, "_file_path", None)
    if path is None or not str(path).endswith(".hdf5"):
        for ep in dataset.iterate_episodes(indices):
            obs, actions = np.asarray(ep.observations), np.asarray(ep.actions)

            def read(obs_out, act_out, obs=obs, actions=actions):
                obs_out[...] = obs
                act_out[...] = actions.reshape(act_out.shape)

            yield ep.id, (ep.rewards, ep.terminations, ep.truncations), len(obs), len(actions), read
        return
    import h5py

    indices = list(indices)
    # HDF5 caches the headers of every object opened while a file is open: reopening the
    # file every 25 episodes keeps that cache small.
    for first in range(0, len(indices), 25):
        with h5py.File(path, "r") as file:
            for index in indices[first:first + 25]:
                group = file[f"episode_{index}"]
                obs, actions = group["observations"], group["actions"]

                def read(obs_out, act_out, obs=obs, actions=actions):
                    for source, out in ((obs, obs_out), (actions, act_out)):
                        if source.shape == out.shape and out.flags.c_contiguous:
                            source.read_direct(out)  # converts dtypes in HDF5, no temporary
                        else:
                            out[...] = np.asarray(source[()]).reshape(out.shape)

                small = tuple(group[k][()] for k in ("rewards", "terminations", "truncations"))
                yield int(index), small, obs.shape[0], actions.shape[0], read


def load_transitions(dataset_ids: Union[str, Sequence[str]], num_episodes: Optional[int] = None,
                     download: bool = True,
                     also: Sequence[Tuple[Union[str, Sequence[str]], Optional[int]]] = ()) -> Transitions:
    """Load datasets (see :func:`load_minari`) and flatten their first ``num_episodes`` episodes.

    Episodes are counted over the concatenation of ``dataset_ids`` in order; all datasets
    must share observation and action spaces. ``next_observations[t]`` is the stored
    observation ``t + 1`` of the same episode. ``also``: further ``(ids, num_episodes)``
    sources appended in the same arrays (no second copy of the data to concatenate).
    """
    sources = [(dataset_ids, num_episodes), *also]
    groups = [[i] if isinstance(i, str) else list(i) for i, _ in sources]
    if not groups[0] or not all(groups):
        raise DatasetError("no dataset id given")
    ids = [i for group in groups for i in group]
    datasets = [load_minari(i, download=download) for i in ids]
    first = datasets[0]
    for i, d in zip(ids[1:], datasets[1:]):
        if d.observation_space != first.observation_space or d.action_space != first.action_space:
            raise DatasetError(
                f"cannot combine {ids[0]!r} (observations {first.observation_space}, actions "
                f"{first.action_space}) with {i!r} (observations {d.observation_space}, actions "
                f"{d.action_space})")
    obs_shape, obs_dtype = _array_spec(first.observation_space, "observation", ids[0])
    act_shape, act_dtype = _array_spec(first.action_space, "action", ids[0])
    plan, start = [], 0  # (dataset, indices of the episodes it contributes)
    for group, (_, episodes) in zip(groups, sources):
        plan += _episode_plan(group, episodes, datasets[start:start + len(group)])
        start += len(group)
    wanted = sum(len(idx) for _, idx in plan)
    # Episode lengths come from metadata so the arrays are allocated exactly once and
    # filled episode by episode: the peak is the arrays plus one episode.
    n = sum(int(m["total_steps"]) for d, idx in plan for m in d.storage.get_episode_metadata(idx))
    if n == 0:
        raise DatasetError(f"datasets {ids} contain no transitions")
    out = dict(episode_observations=np.empty((n + wanted, *obs_shape), obs_dtype),
               actions=np.empty((n, *act_shape), act_dtype),
               rewards=np.empty(n, np.float32), terminations=np.empty(n, bool), truncations=np.empty(n, bool),
               episode_ids=np.empty(n, np.int32), episode_starts=np.zeros(n, bool))
    pos = row = ep_no = 0
    for d, idx in plan:
        for ep_id, (rewards, terminations, truncations), num_obs, num_actions, read in _episodes(d, idx):
            t = len(rewards)
            if num_obs != t + 1 or num_actions != t or pos + t > n:
                raise DatasetError(f"dataset {d.id!r} episode {ep_id} is malformed: {num_obs} observations, "
                                   f"{num_actions} actions, {t} rewards (or lengths differ from metadata)")
            s = slice(pos, pos + t)
            read(out["episode_observations"][row:row + t + 1], out["actions"][s])
            out["rewards"][s] = rewards
            for key, values in (("observations", out["episode_observations"][row:row + t + 1]),
                                ("actions", out["actions"][s]), ("rewards", out["rewards"][s])):
                if values.dtype.kind == "f" and not np.isfinite(values).all():
                    bad = int(np.size(values) - np.isfinite(values).sum())
                    raise DatasetError(f"dataset {d.id!r}: field {key!r} has {bad} non-finite values (NaN/inf) "
                                       f"in episode {ep_id}")
            out["terminations"][s], out["truncations"][s], out["episode_ids"][s] = terminations, truncations, ep_no
            out["episode_starts"][pos:pos + min(t, 1)] = True
            pos, row, ep_no = pos + t, row + t + 1, ep_no + 1
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
        ok = meta.get("total_episodes") == episodes and "ref_max_score" in meta
        reason = "" if ok else "unexpected content"
    except Exception as e:
        reason = f"unreadable: {e}"
    if reason:
        raise DatasetError(f"{dataset_id!r} at {path} is not a bicql quickstart dataset ({episodes} episodes "
                           f"with reference scores; {reason}); delete or move it so it can be recreated")
    return True


def ensure_quickstart_datasets(env_id: str = "CartPole-v1", progress: bool = False) -> Dict[str, str]:
    """Create (once) the expert and mixed-quality datasets of a built-in environment.

    ``bicql/{name}/expert-v0``: 10 built-in expert episodes, seeds 0..9.
    ``bicql/{name}/mixed-v0``: 50 episodes, seeds 1000..1049, episode i acts randomly with
    probability i/49. Both store the expert's and random actions' mean returns on seeds
    10000..10009 as ``ref_max_score`` / ``ref_min_score``. A file lock in the Minari root
    keeps concurrent processes (DDP ranks) from racing. Returns ``{"expert", "offline"}`` ids.
    """
    if env_id not in BUILTIN_EXPERTS:
        raise DatasetError(f"no built-in expert for {env_id!r}; available: {sorted(BUILTIN_EXPERTS)}")
    name = env_id.split("-v")[0].lower()
    ids = {"expert": f"bicql/{name}/expert-v0", "offline": f"bicql/{name}/mixed-v0"}
    expert = BUILTIN_EXPERTS[env_id]
    with FileLock(str(get_dataset_path() / f".bicql-quickstart-{name}.lock")):
        need_expert = not _quickstart_present(ids["expert"], 10)
        need_mixed = not _quickstart_present(ids["offline"], 50)
        if not (need_expert or need_mixed):
            return ids
        space = gym.make(env_id).action_space
        refs = dict(ref_max_score=float(evaluate_policy(env_id, expert, REF_EVAL_SEEDS).mean()),
                    ref_min_score=float(evaluate_policy(env_id, random_policy(space), REF_EVAL_SEEDS).mean()))
        if need_expert:
            collect_dataset(ids["expert"], env_id, expert, 10, seed=0, progress=progress,
                            description=f"10 episodes of the built-in {env_id} expert", **refs)
        if need_mixed:
            mixed = [epsilon_random(expert, i / 49, space) for i in range(50)]
            collect_dataset(ids["offline"], env_id, mixed, 50, seed=1000, progress=progress,
                            description=f"50 {env_id} episodes, episode i random with probability i/49", **refs)
    return ids


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``bicql dataset``: collect a Minari dataset from a built-in, random or npz policy."""
    p = argparse.ArgumentParser(prog="bicql dataset", description=main.__doc__)
    p.add_argument("--env", required=True, help="gymnasium environment id, e.g. CartPole-v1")
    p.add_argument("--policy", default="builtin", help="builtin | random | npz:PATH (default builtin)")
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
        ds = collect_dataset(a.dataset_id, a.env, policy, a.episodes, seed=a.seed, overwrite=a.overwrite,
                             max_episode_steps=a.max_episode_steps, ref_min_score=a.ref_min_score,
                             ref_max_score=a.ref_max_score, progress=not a.no_progress)
    except (ValueError, OSError, gym.error.Error) as e:  # DatasetError, bad --epsilon, unknown env, no file
        print(f"error: {e}", file=sys.stderr)
        return 1
    returns = [float(np.sum(ep.rewards)) for ep in ds.iterate_episodes()]
    print(f"wrote {ds.id} to {get_dataset_path(ds.id)}: {ds.total_episodes} episodes, "
          f"{ds.total_steps} transitions, mean return {np.mean(returns):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
