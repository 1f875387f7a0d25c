"""Whether bf16 autocast pays on this machine's CPU.

``precision: bf16-mixed`` (``configs/bench/bicql.yaml``, ``configs/cluster/ddp.yaml``) makes
the matrix products bf16. CPUs with bf16 instructions (AVX512-BF16, AMX) run them faster
than float32; CPUs without them (AVX2-only x86 among them) emulate them in software, and
measured on an AVX2-only AMD EPYC a 5376x256 @ 256x256 product took 533 ms in bf16 against
12 ms in float32: a benchmark cell that trains in 3 minutes on the first kind ran for over
13 minutes on the second without finishing. Instruction flags differ by vendor and OS, so
this measures the thing that matters instead: one small product in each dtype.
"""

from __future__ import annotations

import functools
import time

import torch

#: bf16 slower than float32 by more than this factor: the CPU has no bf16 arithmetic. Emulated,
#: the product runs about 44x slower (the AMD EPYC above); with AVX512-BF16 and no AMX (an Intel
#: Xeon) 1.6-2.1x in this one-product test, which a factor of 2 split at random from run to run.
SLOW_FACTOR = 8.0


@functools.lru_cache(maxsize=1)
def cpu_bf16_slowdown(rows: int = 512, width: int = 256, repeats: int = 3) -> float:
    """Time of a ``(rows, width) @ (width, width)`` product in bf16 over the same in float32
    on this CPU, one thread (each the best of ``repeats``, after a warm-up). Measured once per
    process."""
    # One thread: the ratio is the instruction set's, not how busy the other cores are.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _ratio(rows, width, repeats)
    finally:
        torch.set_num_threads(threads)


def _ratio(rows: int, width: int, repeats: int) -> float:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, width, generator=generator)
    b = torch.randn(width, width, generator=generator)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up: first-call dispatch and allocation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a.bfloat16(), b.bfloat16()) / max(best(a, b), 1e-9)


def bf16_is_slow_on_cpu() -> bool:
    """Whether bf16 products run more than :data:`SLOW_FACTOR` times slower than float32 here."""
    return cpu_bf16_slowdown() > SLOW_FACTOR


def is_bf16(precision: object) -> bool:
    """Whether a Lightning precision setting (``"bf16-mixed"``, ``"bf16-true"``, ``"bf16"``, …)
    computes in bf16."""
    return str(precision).startswith("bf16")


def slow_bf16_message(precision: object) -> str:
    return (f"precision={precision!r} on this CPU runs bf16 products {cpu_bf16_slowdown():.0f}x slower than "
            "float32 (no bf16 instructions: they are emulated), so training will be many times slower. "
            "Use --trainer.precision 32-true here; bf16-mixed pays only on CPUs with AVX512-BF16 or AMX, "
            "or on a GPU.")
