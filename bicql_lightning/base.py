"""The base every module of the collection (BiCQL-ML and the baselines) builds on.

It holds what is not the algorithm: the update counter and throughput, one optimizer
update with explicit gradient averaging under DDP, the module's own seeded random stream
(drawn for the global batch and sliced per rank), spaces taken from the data module, and
checkpoint markers that let a wrong checkpoint fail with one clear error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .cpu_memory import keep_freed_memory
from .distributed import AtomicCheckpointIO, all_reduce_mean_, is_distributed
from .losses import Metrics
from .networks import ObservationEncoder
from .policies import batch_observations
from .precision import bf16_is_slow_on_cpu, is_bf16, slow_bf16_message
from .reward import CHECKPOINT_KEY, check_checkpoint_model, read_checkpoint
from .spaces import SpaceSpec, check_spec


def check_common_hparams(gamma: float | None = None, hidden_sizes: Sequence[int] | None = None,
                         log_every_n_updates: int | None = None) -> None:
    """The constructor checks the modules share, in one wording (``None``: not checked)."""
    if gamma is not None and not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    if hidden_sizes is not None and not hidden_sizes:
        raise ValueError("hidden_sizes must name at least one hidden layer")
    if log_every_n_updates is not None and log_every_n_updates < 1:
        raise ValueError(f"log_every_n_updates must be at least 1, got {log_every_n_updates}")


class OfflineModule(LightningModule):
    """What every module of the collection shares: counters, DDP updates, the random stream, checkpoints.

    Subclasses set ``model_name``, call ``self.save_hyperparameters()`` and
    ``self._init_state()`` in ``__init__``, and implement ``_build(spaces)``; they build
    at once when given ``spaces`` and otherwise at ``setup`` from the data module.
    Hyperparameters read here: ``updates_per_sec_every``, ``log_every_n_updates`` and the
    seed named by ``seed_hparam``.
    """

    model_name = "?"
    seed_hparam = "sample_seed"  # the hyperparameter seeding the module's random stream

    def _init_state(self) -> None:
        self.automatic_optimization = False
        self.updates = 0  # training steps done; Lightning's global_step counts optimizer steps
        self._rate_mark: tuple[float, int] | None = None
        self._rate = torch.tensor(0.0)
        self.built = False
        self._generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None

    def _build(self, spaces: SpaceSpec) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _adopt_spaces(self, spaces: SpaceSpec) -> None:
        """What every ``_build`` starts with: the spaces (also as a hyperparameter, so a
        checkpoint rebuilds the networks) and the observation encoder."""
        self.hparams["spaces"] = dict(spaces)
        self.spaces = spaces
        self.discrete = spaces["action_kind"] == "discrete"
        self.encoder = ObservationEncoder(spaces["obs_kind"], spaces["obs_dim"])

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"{self.model_name} trains on one device or with DDP (strategy='ddp', ...), not with "
                f"{type(strategy).__name__}: its networks are small and replicated on every process, "
                "and it averages gradients itself."
            )
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.built:
            if datamodule is not None and hasattr(datamodule, "spaces") and datamodule.spaces != self.spaces:
                raise ValueError(
                    f"The model was built for spaces {self.spaces} but the data module serves "
                    f"{datamodule.spaces}. Use a dataset of the same environment, or a new model."
                )
            return
        if datamodule is None or not hasattr(datamodule, "spaces"):
            raise ValueError(f"{self.model_name}(spaces=None) needs an OfflineIRLDataModule to take its spaces from.")
        self._build(check_spec(dict(datamodule.spaces)))

    def on_fit_start(self) -> None:
        world_size, _ = self._world()
        precision = getattr(self.trainer, "precision", None)
        if self.device.type == "cpu" and is_bf16(precision) and bf16_is_slow_on_cpu():
            rank_zero_warn(slow_bf16_message(precision))
        if self.device.type == "cpu":
            keep_freed_memory()  # reuse the last iteration's activations' pages (cpu_memory)
        if self._generator is None or self._generator.device != self.device:
            seed = self._default_seed()
            if is_distributed(world_size):
                seed = self.trainer.strategy.broadcast(seed, src=0)  # one stream for all ranks
            self._make_generator(seed)
        datamodule = getattr(self.trainer, "datamodule", None)
        if not bool(self.encoder.initialized) and datamodule is not None and hasattr(datamodule, "obs_mean"):
            self.encoder.set_statistics(datamodule.obs_mean, datamodule.obs_std)

    # ------------------------------------------------------------------ distributed
    def _world(self) -> tuple[int, int]:
        """``(world_size, global_rank)``; ``(1, 0)`` outside a Trainer."""
        trainer = self._trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    @contextmanager
    def _local_backward(self) -> Iterator[None]:
        """Backward without DDP's gradient hooks: gradients stay local until averaged."""
        model = self._trainer.strategy.model if self._trainer is not None else None
        if isinstance(model, DistributedDataParallel):
            with model.no_sync():
                yield
        else:
            yield

    def _update(self, optimizer, loss: Tensor) -> None:
        """One optimizer update: zero_grad, local backward, gradients averaged over ranks, step."""
        optimizer.zero_grad(set_to_none=True)
        with self._local_backward():
            self.manual_backward(loss)
        world_size, _ = self._world()
        if is_distributed(world_size):
            # Exactly the parameters this optimizer steps. Which ones have a gradient is
            # decided by the (data-independent) graph, so it is the same on every rank.
            grads = [p.grad for group in optimizer.optimizer.param_groups for p in group["params"]
                     if p.grad is not None]
            all_reduce_mean_(grads, world_size)
        optimizer.step()

    def _optimizer_list(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def _step(self, optimizer, objective, *args) -> Metrics:
        """toggle, zero_grad, backward, (average), step, untoggle: one update of ``optimizer``."""
        self.toggle_optimizer(optimizer)
        try:
            loss, metrics = objective(*args)
            self._update(optimizer, loss)
        finally:
            self.untoggle_optimizer(optimizer)
        return metrics

    def _mean_over_ranks(self, metrics: Metrics) -> Metrics:
        """Metrics of the global batch: each rank's values averaged (equal shares), one all_reduce."""
        world_size, _ = self._world()
        if not is_distributed(world_size):
            return metrics
        names = list(metrics)
        stacked = torch.stack([metrics[k].detach().float().reshape(()).to(self.device) for k in names])
        all_reduce_mean_([stacked], world_size)
        return dict(zip(names, stacked.unbind()))

    def _finish_step(self, metrics: Metrics, copy: bool = False) -> None:
        """Count the update and log one row every ``log_every_n_updates`` (of copies of the
        metric tensors with ``copy``, where the next update overwrites them in place)."""
        self.updates += 1
        rate = self._updates_per_sec()
        every = self.hparams.log_every_n_updates or self.trainer.log_every_n_steps
        if self.updates % every == 0:
            if copy:
                metrics = {k: v.clone() for k, v in metrics.items()}
            metrics["train/updates_per_sec"] = rate.to(self.device)
            metrics = self._mean_over_ranks(metrics)
            metrics["train/updates"] = torch.tensor(float(self.updates))
            self.log_dict(metrics, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ throughput
    @property
    def updates_per_sec(self) -> float:
        """Training updates per second, measured over the last ``updates_per_sec_every`` updates."""
        return float(self._rate)

    def _updates_per_sec(self) -> Tensor:
        now = time.perf_counter()
        if self._rate_mark is None:
            self._rate_mark = (now, self.updates)
        elif self.updates - self._rate_mark[1] >= self.hparams.updates_per_sec_every:
            t0, u0 = self._rate_mark
            self._rate = torch.tensor((self.updates - u0) / max(now - t0, 1e-9))
            self._rate_mark = (now, self.updates)
        return self._rate

    # ------------------------------------------------------------------ random stream
    def _default_seed(self) -> int:
        seed = self.hparams.get(self.seed_hparam)
        if seed is not None:
            return int(seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _rng(self) -> torch.Generator:
        """The module's random stream, on the module's device (made on first use)."""
        if self._generator is None or self._generator.device != self.device:
            self._make_generator(self._default_seed())
        return self._generator

    def _make_generator(self, seed: int) -> None:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        pending, self._pending_generator_state = self._pending_generator_state, None
        if pending is not None:
            if pending.numel() == generator.get_state().numel():
                generator.set_state(pending)
            else:
                rank_zero_warn(
                    f"The checkpoint's random stream was saved on another kind of device; on "
                    f"{self.device.type} it restarts from seed {seed} (training continues, but "
                    "not bit for bit as it would have on the original device)."
                )
        self._generator = generator

    def _normal_noise(self, local_rows: int, shape: Sequence[int]) -> Tensor:
        """Standard normals ``(local_rows, *shape)`` for this rank's rows of a global batch:
        drawn for all ranks' rows from the module's stream and sliced, so that W processes
        draw what one process would."""
        world_size, rank = self._world()
        noise = torch.randn((local_rows * world_size, *shape), generator=self._rng(), device=self.device)
        return noise[rank * local_rows:(rank + 1) * local_rows]

    def _uniform_noise(self, local_rows: int, shape: Sequence[int]) -> Tensor:
        """Uniforms on [0, 1) ``(local_rows, *shape)``, drawn and sliced as ``_normal_noise``."""
        world_size, rank = self._world()
        noise = torch.rand((local_rows * world_size, *shape), generator=self._rng(), device=self.device)
        return noise[rank * local_rows:(rank + 1) * local_rows]

    # ------------------------------------------------------------------ acting helpers
    def _obs_tensor(self, obs: np.ndarray | Tensor) -> tuple[Tensor, bool]:
        """Raw observation(s) as a batched tensor on the module's device, and whether it was one."""
        return batch_observations(obs, self.spaces["obs_kind"], self.device)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"model": self.model_name, "updates": self.updates}
        if self._generator is not None:
            info["generator"] = self._generator.get_state()
        return info

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self._checkpoint_info()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_model(checkpoint, self.model_name)
        info = checkpoint[CHECKPOINT_KEY]
        self.updates = int(info["updates"])
        if info.get("generator") is not None:
            # Applied when the stream is (re)made on the training device (on_fit_start).
            self._generator = None
            self._pending_generator_state = info["generator"]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):  # type: ignore[override]
        """Lightning's loader, after checking the file holds this model (one clear error if not)."""
        if isinstance(checkpoint_path, (str, bytes)) or hasattr(checkpoint_path, "__fspath__"):
            read_checkpoint(checkpoint_path, cls.model_name)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
