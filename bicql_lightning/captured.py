r"""One training iteration captured as one CUDA graph (``BiCQLML(capture_graph=True)``).

At the benchmark's sizes (batch 256, two 256x256 twins) an update on a large GPU is a few
hundred small kernels, and their launches, not the arithmetic, set the rate. A CUDA graph
records the launches of one whole iteration once and replays them with one call:

1. sampling: the offline and expert batches drawn from the data module's device-resident
   stores with its own generator (the draws ``sample_batch`` makes in the eager path);
2. the lower level's ``q_updates`` (TD + CQL, backward, Adam) and the upper level's
   ``reward_updates``, through the module's own ``_iteration``, so the graph holds exactly
   the eager algorithm;
3. the target network's Polyak step (what :class:`~bicql_lightning.TargetNetworkUpdate`
   does after an eager step);
4. the iteration's metrics, left in the graph's output tensors: nothing is read back to
   the host inside it, and the module reads them only every ``log_every_n_updates``.

Replaying needs every tensor an iteration touches to stay where capture found it. That is
why Adam is built ``capturable``, why the data stay on the device, why both random streams
(the data module's and the module's proposal noise) are registered with the graph (each
replay then advances them as the eager draws would), and why autocast's weight cache is
off during capture. The first ``warmup`` iterations run eagerly on a side stream, as
CUDA's capture rules require; they are real updates.

Off CUDA there are no graphs: :meth:`step` runs the same function eagerly. That is what
the CPU tests compare with the ordinary path (same parameters after N updates); the
replayed graph is compared with eager training on a GPU by the test that needs one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

Metrics = dict[str, Tensor]


class CapturedIteration:
    """Run ``iteration`` (sample, update both levels, sync the target) as one CUDA graph.

    Args:
        iteration: one whole training iteration; returns its metrics (tensors on the device).
        device: where it runs; graphs only on ``cuda``.
        generators: the random streams the iteration draws from (registered with the graph).
        warmup: eager iterations before capture (CUDA only).
    """

    def __init__(self, iteration: Callable[[], Metrics], device: torch.device,
                 generators: list[torch.Generator], warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1, got {warmup}")
        self.iteration, self.device, self.generators, self.warmup = iteration, device, generators, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Metrics | None = None
        self.calls = 0
        self._side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def step(self) -> Metrics:
        """One iteration: eager (off CUDA, and during warm-up), else a replay. The metrics
        returned are the graph's own output tensors: copy them to keep them past the next call."""
        self.calls += 1
        if self.device.type != "cuda":
            return self.iteration()
        if self.graph is None and self.calls <= self.warmup:
            stream = self._side_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                out = self.iteration()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            return out
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.outputs

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph), _autocast_without_cache(self.device):
            self.outputs = self.iteration()
        self.graph = graph  # capture records the launches; the first replay runs them


def _autocast_without_cache(device: torch.device):
    """Autocast as it is around the capture, but without its weight-cast cache: a cached
    cast made during capture would be freed and reused behind the graph's back."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)

