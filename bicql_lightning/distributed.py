"""What makes training distributed and crash-safe: collectives and atomic checkpoints.

Shared by every module of the collection (BiCQL-ML and the baselines): gradients are
averaged explicitly, one flattened ``all_reduce`` per update, so the code says what is
synchronised; checkpoints are written so that a crash never costs the last good one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor


def full_precision(x: Tensor) -> Tensor:
    """At least float32: network outputs computed in bf16/fp16 under autocast are promoted
    before they enter log-sum-exps, targets and losses (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def is_distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def all_reduce_mean_(tensors: Sequence[Tensor], world_size: int) -> None:
    """Average ``tensors`` over all processes in place: one flattened ``all_reduce`` per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
        flat.div_(world_size)
        torch._foreach_copy_(group, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in group]), group)])


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s ``tensors`` to every process: one flattened broadcast per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        with torch.no_grad():
            torch._foreach_copy_(group, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in group]), group)])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint format, written so that a crash never costs the last good file.

    Lightning 2.6's ``TorchCheckpointIO`` serialises into memory and hands the bytes to an
    fsspec transaction, which writes them to ``tempfile.mkstemp()`` (the system temporary
    directory) and ``shutil.move`` moves that onto the target: an atomic rename only when
    the temporary directory and the checkpoint directory share a file system. On a
    cluster they rarely do (node-local ``/tmp``, checkpoints on NFS/Lustre): the move then
    truncates the existing ``last.ckpt`` and copies into it, so a job killed during the
    copy leaves a truncated ``last.ckpt`` and nothing to resume from; nothing is fsynced
    either. This plugin writes local checkpoints to a temporary file in the target's own
    directory, fsyncs it, renames it over the target (``os.replace``) and fsyncs the directory:
    the target is the old file or the complete new one, never a mixture. The temporary
    file's name holds no ``last``, so ``ckpt_path="last"`` can never pick a partial one.
    Remote paths (``s3://`` …) go through Lightning's own transaction unchanged.

    ``BiCQLML`` installs it at ``setup`` when the trainer uses the default
    ``TorchCheckpointIO``; a plugin given to the ``Trainer`` is left alone.
    """

    PARTIAL = re.compile(r"^\.partial-(\d+)-\d+\.ckpt-tmp$")

    def __init__(self) -> None:
        super().__init__()
        self._count = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        path = os.path.abspath(os.fspath(path))
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        self._remove_stale_partials(directory)
        self._count += 1
        tmp = os.path.join(directory, f".partial-{os.getpid()}-{self._count}.ckpt-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._fsync_directory(directory)

    @staticmethod
    def _fsync_directory(directory: str) -> None:
        with suppress(OSError):  # not every file system lets a directory be opened
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _remove_stale_partials(self, directory: str) -> None:
        """Remove temporary files that killed processes left behind (never one of ours)."""
        with suppress(OSError):
            for name in os.listdir(directory):
                found = self.PARTIAL.match(name)
                if found and int(found.group(1)) != os.getpid():
                    with suppress(OSError):
                        os.unlink(os.path.join(directory, name))
