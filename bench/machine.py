"""What a benchmark ran on, for the line it prints and the results it writes."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(gpu_used: bool | None = None, threads: bool = False) -> str:
    """CPU model and cores, the GPU when torch sees one (and, if ``gpu_used`` is given, it
    was used), and with ``threads`` torch's intra-op thread count."""
    import torch

    show = torch.cuda.is_available() if gpu_used is None else gpu_used and torch.cuda.is_available()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if show else ""
    count = f", {torch.get_num_threads()} threads" if threads else ""
    return f"{cpu_model()}, {os.cpu_count()} cores{gpu}{count}"
