"""CPU training keeps freed memory (``bicql_lightning.cpu_memory``): a large block freed and
allocated again costs no page faults once the setting is on, and the setting is what a fit
on a CPU turns on by default. Each case runs in a fresh interpreter: the allocator's
settings are the process's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

# 20 times: allocate a 48 MB tensor (one stacked activation of eight seeds is 46 MB), write
# it, free it. Prints the page faults of those 20 cycles and whether the setting took.
PROBE = r"""
import json, resource, sys
import torch
from bicql_lightning.cpu_memory import keep_freed_memory
mode = sys.argv[1]
kept = keep_freed_memory() if mode == "call" else None
if mode == "fit":
    from tests.test_cpu_memory import tiny_fit
    tiny_fit()
    from bicql_lightning import cpu_memory
    kept = cpu_memory._applied
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(12_000_000); del x
before = faults()
for _ in range(20):
    x = torch.empty(12_000_000); x.fill_(1.0); del x
print(json.dumps({"kept": kept, "faults": faults() - before}))
"""
PAGES_PER_BLOCK = 12_000_000 * 4 // 4096


def probe(mode: str, **env: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=root, check=True,
                         env={**os.environ, "PYTHONPATH": root, **env}, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_fit() -> None:
    """Two BiCQL-ML updates on a CPU, as a user's ``Trainer.fit`` runs them, on the tiny
    Pendulum datasets that ``MINARI_DATASETS_PATH`` holds."""
    import lightning as L

    from bicql_lightning import BiCQLML, OfflineIRLDataModule

    dm = OfflineIRLDataModule("tiny/pendulum/expert-v0", "tiny/pendulum/mixed-v0", batch_size=16,
                              batches_per_epoch=2, val_size=16)
    model = BiCQLML(hidden_sizes=[8], reward_hidden_sizes=[8], proposal_hidden_sizes=[8], proposal_fit_steps=2,
                    num_action_samples=2, policy={"init_args": {"num_candidates": 2, "hidden_sizes": [8],
                                                                "fit_steps": 2}})
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
              enable_progress_bar=False, enable_model_summary=False).fit(model, dm)


def test_freed_blocks_are_reused_without_page_faults():
    default = probe("none")
    kept = probe("call")
    assert kept["kept"] is True
    # glibc's default maps every cycle's block afresh: each page faults again.
    assert default["faults"] >= 15 * PAGES_PER_BLOCK
    # Kept: the heap grows once or twice (a small allocation can land in the freed block),
    # then every cycle reuses it.
    assert kept["faults"] <= 3 * PAGES_PER_BLOCK


def test_a_fit_on_a_cpu_keeps_freed_memory_unless_the_environment_says_no(tiny_data):
    root = str(tiny_data.root)
    on = probe("fit", MINARI_DATASETS_PATH=root)
    # After a fit more small allocations can land in a freed block, and each time the heap
    # grows by one block (3.0003 blocks seen once on an AVX2 AMD EPYC): far below the 20
    # blocks of glibc's default, asserted below.
    assert on["kept"] is True and on["faults"] <= 5 * PAGES_PER_BLOCK
    off = probe("fit", MINARI_DATASETS_PATH=root, BICQL_KEEP_FREED_MEMORY="0")
    assert off["kept"] is False
    assert off["faults"] >= 15 * PAGES_PER_BLOCK
