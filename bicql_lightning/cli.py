"""The ``bicql`` command: LightningCLI for training, plus ``bicql dataset`` for data.

``bicql fit --config configs/quickstart.yaml`` trains BiCQL-ML; ``--model
bicql_lightning.BehaviorCloning`` (or ``IQLearn``) trains a baseline on the same data;
``bicql fit --print_config`` shows every hyperparameter; ``bicql dataset --help`` makes Minari datasets from a policy.

Several GPUs or nodes: ``--trainer.strategy ddp`` with ``--trainer.devices`` and
``--trainer.num_nodes`` (``data.batch_size`` is the global batch), under ``srun`` or
``torchrun`` too; ``--ckpt_path last`` starts a run or resumes it. See docs/cluster.md,
configs/cluster/ddp.yaml and scripts/slurm/train.sbatch.
"""

from __future__ import annotations

import sys

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from .datamodule import OfflineIRLDataModule


class BiCQLCLI(LightningCLI):
    """Any LightningModule of the collection (``--model bicql_lightning.BehaviorCloning``);
    BiCQLML when the config names none."""

    def add_arguments_to_parser(self, parser) -> None:
        # The model's networks are sized from the data: the data module reads the
        # datasets' spaces and hands them over once instantiated.
        parser.link_arguments("data.spaces", "model.init_args.spaces", apply_on="instantiate")
        parser.set_defaults({"model": {"class_path": "bicql_lightning.BiCQLML"}})


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "dataset":
        from .datasets import main as dataset_main

        raise SystemExit(dataset_main(args[1:]))
    # The module owns its two optimizers (manual optimisation): no CLI-level optimizer.
    BiCQLCLI(LightningModule, OfflineIRLDataModule, subclass_mode_model=True, args=argv,
             save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)


if __name__ == "__main__":
    main()
