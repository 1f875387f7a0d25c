"""Offline and expert transitions from Minari datasets, served as index-sampled tensors.

Per-item ``Dataset``/``DataLoader`` pipelines cost more than a whole BiCQL-ML update, so
the transitions are held as tensors (on the training device when they fit) and each step
draws random indices with a seeded generator whose state is saved in the checkpoint.

Under DDP the batch sizes are *global*: every process draws the same global indices
from an identically seeded generator and keeps its contiguous share of ``B / world_size``
rows, so any number of processes trains on exactly the batches one process would.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .datasets import DatasetError, Transitions, ensure_quickstart_datasets, load_minari, load_transitions
from .demonstrations import concatenate, subsample
from .spaces import SpaceSpec, space_spec

# Dataset ids the package can make on the spot from a built-in expert, with no download.
QUICKSTART_ENVS = {"cartpole": "CartPole-v1", "pendulum": "Pendulum-v1"}
FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


class TransitionStore:
    """Transitions as tensors sampled by index, observations stored once.

    ``obs`` holds every stored observation (each episode's T + 1); transition ``t`` of
    episode ``k`` goes from row ``t + k`` to ``t + k + 1``, so only the episode numbers
    (int32) are kept to find rows. The tensors share memory with the loaded
    numpy arrays where dtypes agree (Box observations and actions, rewards), so a
    dataset is held once: measured by ``bench/memory.py``.
    """

    def __init__(self, transitions: Transitions):
        obs = transitions.episode_observations
        obs_dtype = torch.long if obs.dtype.kind in "iu" else torch.float32
        act_dtype = torch.long if transitions.actions.dtype.kind in "iu" else torch.float32
        self.obs = torch.as_tensor(obs).to(obs_dtype)
        self.episode = torch.as_tensor(transitions.episode_ids)
        # The episode of each transition: the segment numbers above unless demonstrations
        # were subsampled (each kept transition a segment of its own).
        numbers = getattr(transitions, "episode_numbers", None)
        self.episode_number = self.episode if numbers is None else torch.as_tensor(numbers)
        self.fields: dict[str, Tensor] = {
            "action": torch.as_tensor(transitions.actions).to(act_dtype),
            "reward": torch.as_tensor(transitions.rewards).to(torch.float32),
            "terminated": torch.as_tensor(transitions.terminations),  # bool; float per batch
        }

    def __len__(self) -> int:
        return self.episode.shape[0]

    def to(self, device: torch.device) -> TransitionStore:
        shared = self.episode_number is self.episode
        self.obs, self.episode = self.obs.to(device), self.episode.to(device)
        self.episode_number = self.episode if shared else self.episode_number.to(device)
        self.fields = {k: v.to(device) for k, v in self.fields.items()}
        return self

    def pin_memory(self) -> TransitionStore:
        shared = self.episode_number is self.episode
        self.obs, self.episode = self.obs.pin_memory(), self.episode.pin_memory()
        self.episode_number = self.episode if shared else self.episode_number.pin_memory()
        self.fields = {k: v.pin_memory() for k, v in self.fields.items()}
        return self

    @property
    def device(self) -> torch.device:
        return self.obs.device

    def take(self, index: Tensor) -> dict[str, Tensor]:
        """The transitions at ``index`` as a batch dict (``FIELDS``)."""
        row = self.rows(index)
        return {"obs": self.obs[row], "action": self.fields["action"][index],
                "reward": self.fields["reward"][index], "next_obs": self.obs[row + 1],
                "terminated": self.fields["terminated"][index].float()}

    @property
    def tensors(self) -> dict[str, Tensor]:
        """Every transition as one batch dict: a copy of the whole store, for inspection
        and small data (training samples with :meth:`sample`)."""
        return self.take(torch.arange(len(self), device=self.device))

    def observations(self, chunk: int = 1 << 13):
        """Each transition's observation, ``chunk`` rows at a time (no copy of them all)."""
        for start in range(0, len(self), chunk):
            yield self.obs[self.rows(slice(start, start + chunk))]

    def pairs(self, index: Tensor | slice = slice(None)) -> tuple[Tensor, Tensor]:
        """(observations, actions) of the transitions at ``index``: only those are gathered."""
        return self.obs[self.rows(index)], self.fields["action"][index]

    def rows(self, index: Tensor | slice) -> Tensor:
        """Rows of ``obs`` holding the observations of the transitions at ``index``."""
        if isinstance(index, slice):
            start, stop, _ = index.indices(len(self))
            return torch.arange(start, stop, device=self.device) + self.episode[index]
        return index + self.episode[index]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.obs, self.episode, *self.fields.values()))

    def sample(self, batch_size: int, generator: torch.Generator, world_size: int = 1,
               rank: int = 0) -> dict[str, Tensor]:
        """Rank ``rank``'s contiguous share of a global batch of ``batch_size`` random rows."""
        index = torch.randint(0, len(self), (batch_size,), generator=generator, device=generator.device)
        share = batch_size // world_size
        return self.take(index[rank * share:(rank + 1) * share].to(self.device))


def shard_size(batch_size: int, world_size: int, name: str = "batch_size") -> int:
    """Rows per process of a global batch; a clear error unless it divides evenly."""
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        raise ValueError(
            f"{name}={batch_size} is the global batch over all {world_size} processes and must be "
            f"divisible by {world_size}; use {lower or world_size} or {lower + world_size}."
        )
    return batch_size // world_size



class _BatchStream:
    """An epoch of ``{"offline": batch, "expert": batch}`` dicts, sampled on the fly
    (or one fixed batch repeated, for validation). Not a list: Lightning would take a
    list for several dataloaders.

    Each batch is drawn when Lightning asks for it: the stream is sized, so Lightning 2.x
    does not fetch ahead, and a checkpoint saved after a step holds the sampler state
    right after that step's draw. The stream has no state of its own (the draws' state
    is the data module's, in the checkpoint), so it tells Lightning it can be resumed
    mid-epoch: the resumed epoch draws exactly the batches the interrupted one would have.
    """

    def __init__(self, datamodule: OfflineIRLDataModule | None, length: int,
                 fixed: dict[str, Any] | None = None):
        self.datamodule, self.length, self.fixed = datamodule, length, fixed

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            if self.fixed is not None:
                yield self.fixed
            elif self._model_draws():
                yield {}  # the model samples inside its own (captured) iteration
            else:
                yield self.datamodule.sample_batch()

    def _model_draws(self) -> bool:
        trainer = self.datamodule.trainer
        return bool(getattr(trainer.lightning_module, "draws_own_batches", False)) if trainer is not None else False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class OfflineIRLDataModule(LightningDataModule):
    """Serves offline data D and expert demonstrations D_E from Minari datasets.

    Args:
        expert_dataset: Minari id(s) of the expert demonstrations D_E. Ids under
            ``bicql/cartpole/`` and ``bicql/pendulum/`` are made locally from a built-in
            expert the first time they are asked for (no download).
        offline_dataset: Minari id(s) of the offline data D; ``None`` uses D_E as D, and
            then one batch serves as both (``batch["offline"] is batch["expert"]``) unless
            ``expert_batch_size`` differs: the same tensors are never drawn or scored twice.
        expert_episodes: keep only the first N expert episodes (``None``: all).
        offline_episodes: keep only the first N offline episodes (``None``: all).
        include_expert_in_offline: add the (kept) expert transitions to D.
        expert_subsample: keep only the transitions at steps 0, k, 2k, ... of each expert
            episode, each whole (``k`` = this; ``None``: every transition). The others are
            used nowhere, neither in D_E nor in D (the GAIL/DAC protocol; the benchmark's
            ``sub20`` is 20). See :mod:`bicql_lightning.demonstrations`.
        batch_size: offline batch size per step: the global batch over all processes
            (each of W DDP processes uses ``batch_size / W`` rows; it must divide evenly).
        expert_batch_size: expert batch size per step, global like ``batch_size``
            (``None``: ``batch_size``).
        batches_per_epoch: training steps per epoch (the data is sampled, not iterated).
        normalize_observations: standardise Box observations with D's mean and std.
        data_on_device: keep the tensors on the training device (sampling there too) when
            they take at most half of its free memory; otherwise they stay in (pinned)
            host memory with a warning, and each batch is copied over.
        val_size: expert transitions in the validation batch.
        seed: seed of the index sampler.
        download: try to download ids missing locally (Minari's remote datasets).
    """

    def __init__(
        self,
        expert_dataset: str | list[str] = "bicql/cartpole/expert-v0",
        offline_dataset: str | list[str] | None = "bicql/cartpole/mixed-v0",
        expert_episodes: int | None = None,
        offline_episodes: int | None = None,
        include_expert_in_offline: bool = True,
        expert_subsample: int | None = None,
        batch_size: int = 256,
        expert_batch_size: int | None = None,
        batches_per_epoch: int = 1000,
        normalize_observations: bool = True,
        data_on_device: bool = True,
        val_size: int = 2048,
        seed: int = 0,
        download: bool = True,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("batches_per_epoch", batches_per_epoch),
                            ("val_size", val_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if expert_subsample is not None and expert_subsample < 1:
            raise ValueError(f"expert_subsample must be at least 1 (or null: every transition), got {expert_subsample}")
        if expert_batch_size is not None and expert_batch_size < 1:
            raise ValueError(f"expert_batch_size must be at least 1, got {expert_batch_size}")
        self.save_hyperparameters()
        self._loaded = False
        self._generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None
        self._world_size, self._rank = 1, 0

    # ------------------------------------------------------------------ loading
    def _ensure_quickstart(self, ids: list[str]) -> None:
        for dataset_id in ids:
            parts = dataset_id.split("/")
            if len(parts) == 3 and parts[0] == "bicql" and parts[1] in QUICKSTART_ENVS:
                ensure_quickstart_datasets(QUICKSTART_ENVS[parts[1]])

    def load(self) -> None:
        """Read the datasets (idempotent). Called by ``setup`` and by ``spaces``."""
        if self._loaded:
            return
        hp = self.hparams
        expert_ids = [hp.expert_dataset] if isinstance(hp.expert_dataset, str) else list(hp.expert_dataset)
        offline_ids = ([] if hp.offline_dataset is None else
                       [hp.offline_dataset] if isinstance(hp.offline_dataset, str) else list(hp.offline_dataset))
        self._ensure_quickstart(expert_ids + offline_ids)
        self.expert = load_transitions(expert_ids, hp.expert_episodes, download=hp.download)
        # Counted before subsampling, which may drop an episode's last transition.
        self._expert_terminations = int(self.expert.terminations.sum())
        if hp.expert_subsample:
            self.expert = subsample(self.expert, hp.expert_subsample)
        for dataset_id in offline_ids:  # checked on the metadata, before anything large is read
            offline = load_minari(dataset_id, download=hp.download)
            for what in ("observation_space", "action_space"):
                if getattr(offline, what) != getattr(self.expert, what):
                    raise DatasetError(
                        f"The offline data {offline_ids} and the expert data {expert_ids} have "
                        f"different {what.replace('_', ' ')}s: {getattr(offline, what)} vs "
                        f"{getattr(self.expert, what)}. Both must come from the same environment."
                    )
        if not offline_ids:
            self.offline = None
        elif hp.expert_subsample and hp.include_expert_in_offline:
            # D gets the kept demonstration transitions only, after its own episodes.
            self.offline = concatenate(load_transitions(offline_ids, hp.offline_episodes, download=hp.download),
                                       self.expert)
        else:
            # D with the expert transitions appended is read into one set of arrays.
            also = [(expert_ids, hp.expert_episodes)] if hp.include_expert_in_offline else []
            self.offline = load_transitions(offline_ids, hp.offline_episodes, download=hp.download, also=also)
        self._spaces: SpaceSpec = space_spec(self.expert.observation_space, self.expert.action_space)
        self.expert_store = TransitionStore(self.expert)
        self.offline_store = self.expert_store if self.offline is None else TransitionStore(self.offline)
        self.obs_mean, self.obs_std = self._statistics(self.offline_store)
        self._loaded = True

    def _statistics(self, store: TransitionStore) -> tuple[Tensor, Tensor]:
        dim = self._spaces["obs_dim"]
        if self._spaces["obs_kind"] == "discrete" or not self.hparams.normalize_observations:
            return torch.zeros(dim), torch.ones(dim)
        # In float64 chunks: a float64 copy of a large dataset would double its memory.
        total, total_sq = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
        for chunk in store.observations():
            flat = chunk.reshape(chunk.shape[0], -1).double()
            total += flat.sum(0)
            total_sq += flat.pow(2).sum(0)
        mean = total / len(store)
        std = (total_sq / len(store) - mean.pow(2)).clamp_min(0).sqrt()
        # Constant features would divide by zero; leave them unscaled.
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
        return mean.float(), std.float()

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node, then lets every process set up:
        # datasets are made or downloaded once, never by several processes at a time.
        hp = self.hparams
        ids = [hp.expert_dataset] if isinstance(hp.expert_dataset, str) else list(hp.expert_dataset)
        if hp.offline_dataset is not None:
            ids += [hp.offline_dataset] if isinstance(hp.offline_dataset, str) else list(hp.offline_dataset)
        self._ensure_quickstart(ids)
        for dataset_id in ids:
            load_minari(dataset_id, download=hp.download)

    def setup(self, stage: str, device: torch.device | str | None = None) -> None:
        """``device``: the training device of a fit without a Trainer (``bicql_lightning.seeds``);
        with a Trainer it is the trainer's."""
        self.load()
        if self.trainer is not None:
            self._configure_shards(self.trainer.world_size, self.trainer.global_rank)
        device = self._data_device(None if device is None else torch.device(device))
        stores = [self.expert_store] + ([self.offline_store] if self.offline_store is not self.expert_store else [])
        for store in stores:
            store.to(device)
            if device.type == "cpu" and self.trainer is not None and self.trainer.strategy.root_device.type == "cuda":
                store.pin_memory()
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.hparams.seed)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)

    def _configure_shards(self, world_size: int, rank: int) -> None:
        """Serve rank ``rank``'s share of every global batch of ``world_size`` processes."""
        hp = self.hparams
        shard_size(hp.batch_size, world_size, "batch_size")
        if hp.expert_batch_size is not None:
            shard_size(hp.expert_batch_size, world_size, "expert_batch_size")
        self._world_size, self._rank = world_size, rank

    def _data_device(self, device: torch.device | None = None) -> torch.device:
        """The training device (``device``, else the trainer's) if asked and the tensors fit
        there, else the CPU."""
        if device is None and self.trainer is not None:
            device = self.trainer.strategy.root_device
        if not self.hparams.data_on_device or device is None:
            return torch.device("cpu")
        if device.type == "cuda":
            need = self.expert_store.nbytes + (self.offline_store.nbytes if self.offline_store is not self.expert_store
                                               else 0)
            free, _ = torch.cuda.mem_get_info(device)
            if need > free // 2:
                rank_zero_warn(
                    f"The transitions take {need / 2**30:.2f} GiB, more than half of the "
                    f"{free / 2**30:.2f} GiB free on {device}: they stay in host memory and every "
                    "batch is copied over (data_on_device=false does this without the check)."
                )
                return torch.device("cpu")
        return device

    # ------------------------------------------------------------------ serving
    @property
    def spaces(self) -> SpaceSpec:
        """The datasets' spaces as plain data; what the model's networks are sized by."""
        self.load()
        return self._spaces

    @property
    def env_spec(self) -> gym.envs.registration.EnvSpec | None:
        self.load()
        return self.expert.env_spec

    @property
    def ref_scores(self) -> tuple[float | None, float | None]:
        """``(R_random, R_expert)`` from the expert dataset's metadata, where known."""
        self.load()
        return self.expert.ref_min_score, self.expert.ref_max_score

    def sample_batch(self) -> dict[str, dict[str, Tensor]]:
        """This process's share of the next global batch (all of it in one process)."""
        if self._generator is None:
            self.setup("fit")
        hp = self.hparams
        shards = (self._world_size, self._rank)
        offline = self.offline_store.sample(hp.batch_size, self._generator, *shards)
        if self.shared_batches:
            return {"offline": offline, "expert": offline}
        return {"offline": offline,
                "expert": self.expert_store.sample(hp.expert_batch_size or hp.batch_size, self._generator, *shards)}

    @property
    def sampling_generator(self) -> torch.Generator:
        """The generator :meth:`sample_batch` draws from (a captured iteration registers it
        with its CUDA graph, so that each replay advances it as an eager draw would)."""
        if self._generator is None:
            self.setup("fit")
        return self._generator

    @property
    def shared_batches(self) -> bool:
        """Whether D is D_E and one batch serves as the offline and the expert batch."""
        self.load()
        hp = self.hparams
        return self.offline_store is self.expert_store and hp.expert_batch_size in (None, hp.batch_size)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Moving a shared batch part by part would make two copies of it.
        if isinstance(batch, dict) and "offline" in batch and batch.get("expert") is batch["offline"]:
            moved = super().transfer_batch_to_device(batch["offline"], device, dataloader_idx)
            return {**batch, "offline": moved, "expert": moved}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self):
        return _BatchStream(self, self.hparams.batches_per_epoch)

    def val_dataloader(self):
        # A fixed, seeded subset of D_E: the same validation batch every time.
        n = len(self.expert_store)
        gen = torch.Generator().manual_seed(self.hparams.seed + 1)
        index = torch.randperm(n, generator=gen)[: self.hparams.val_size].to(self.expert_store.device)
        return _BatchStream(None, 1, fixed={"expert": self.expert_store.take(index)})

    # ------------------------------------------------------------------ what models ask for
    # The named contract with the models (policies.OfflineData): nothing else of the data
    # module is read by them. ``which``: "expert" (D_E) or "offline" (D).
    @property
    def offline_is_expert(self) -> bool:
        """Whether D is D_E (no offline dataset): one set of transitions."""
        self.load()
        return self.offline_store is self.expert_store

    def _store(self, which: str) -> TransitionStore:
        if which not in ("expert", "offline"):
            raise ValueError(f"which must be 'expert' or 'offline', got {which!r}")
        self.load()
        return self.expert_store if which == "expert" else self.offline_store

    def num_transitions(self, which: str) -> int:
        return len(self._store(which))

    def pairs(self, which: str, index: Tensor | slice = slice(None)) -> tuple[Tensor, Tensor]:
        """(observations, actions) of D_E's or D's transitions at ``index`` (all by default)."""
        store = self._store(which)
        if isinstance(index, Tensor):
            index = index.to(store.device)
        return store.pairs(index)

    def expert_in_offline(self) -> Tensor:
        """Which of D's transitions ``(N,)`` are D_E's own (``include_expert_in_offline``
        appends them after D's episodes), as a bool mask on D's device."""
        store = self._store("offline")
        mask = torch.zeros(len(store), dtype=torch.bool, device=store.device)
        if store is self.expert_store:
            mask[:] = True
        elif self.hparams.include_expert_in_offline:
            mask[len(store) - len(self.expert_store):] = True
        return mask

    def terminations(self, which: str) -> int:
        """Terminal transitions of D_E (counted before ``expert_subsample``) or of D."""
        store = self._store(which)
        if store is self.expert_store:
            return self._expert_terminations
        return int(store.fields["terminated"].sum())

    def episodes(self, which: str) -> Tensor:
        """The episode number of each transition of D_E or D, ``(N,)`` integers."""
        return self._store(which).episode_number

    def consecutive_share(self, which: str) -> float:
        """The share of D_E's or D's transitions that the next one of their episode follows
        in the set: about 1 for whole demonstrations, 0 after ``expert_subsample`` (every
        kept transition then stands alone)."""
        store = self._store(which)
        if len(store) == 0:
            return 0.0
        return 1.0 - int(torch.unique(store.episode).numel()) / len(store)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"obs_mean": self.obs_mean, "obs_std": self.obs_std} if self._loaded else {}
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._generator is None:
            self._pending_state = state_dict
        else:
            self._apply_state(state_dict)

    def _apply_state(self, state: dict[str, Any]) -> None:
        if "generator" in state and self._generator is not None:
            if state["generator"].numel() == self._generator.get_state().numel():
                self._generator.set_state(state["generator"])
            else:
                rank_zero_warn(
                    "The checkpoint's index sampler was saved on another kind of device; the index "
                    f"stream restarts from seed {self.hparams.seed} on {self._generator.device.type}."
                )
        if "obs_mean" in state:
            self.obs_mean, self.obs_std = state["obs_mean"], state["obs_std"]
        self._pending_state = None
