"""The ``bicql`` command: LightningCLI for training, plus ``bicql dataset`` for data.

``bicql fit --config configs/quickstart.yaml`` trains BiCQL-ML; ``--model
bicql_lightning.BehaviorCloning`` (or ``IQLearn``) trains a baseline on the same data;
``bicql fit --print_config`` shows every hyperparameter; ``bicql dataset --help`` makes
Minari datasets from a policy.

A mistake in the data, the checkpoint or the configuration ends the command with one line
on standard error that says what is wrong and how to fix it, and exit status 2; with
``--traceback`` (or ``BICQL_TRACEBACK=1``) the full traceback is shown instead.

Several GPUs or nodes: ``--trainer.strategy ddp`` with ``--trainer.devices`` and
``--trainer.num_nodes`` (``data.batch_size`` is the global batch), under ``srun`` or
``torchrun`` too; ``--ckpt_path last`` starts a run or resumes it. See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI

from .datamodule import OfflineIRLDataModule
from .datasets import DatasetError
from .reward import CheckpointError, read_checkpoint

PACKAGE_DIR = Path(__file__).resolve().parent
TRACEBACK_ENV = "BICQL_TRACEBACK"
# --ckpt_path values Lightning resolves itself (last.ckpt of the run, the best, HPC).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")

HELP = """usage: bicql {fit,validate,test,predict,dataset} ...

BiCQL-ML offline inverse RL, and its baselines, on Minari datasets.

subcommands:
  fit        train a model: bicql fit --config configs/quickstart.yaml
             (--print_config shows every setting; --model bicql_lightning.BehaviorCloning
             or bicql_lightning.IQLearn trains a baseline on the same data)
  validate   score a checkpoint on the validation batch: --ckpt_path PATH
  test       Lightning's test loop (the modules define none)
  predict    Lightning's predict loop (the modules define none)
  dataset    make a Minari dataset from a policy: bicql dataset --help

options:
  -h, --help   this message; `bicql SUBCOMMAND --help` for a subcommand's options
  --traceback  show the full traceback of an error (or set BICQL_TRACEBACK=1)
"""


class BiCQLCLI(LightningCLI):
    """Any LightningModule of the collection (``--model bicql_lightning.BehaviorCloning``);
    BiCQLML when the config names none."""

    def add_arguments_to_parser(self, parser) -> None:
        # The model's networks are sized from the data: the data module reads the
        # datasets' spaces and hands them over once instantiated.
        parser.link_arguments("data.spaces", "model.init_args.spaces", apply_on="instantiate")
        parser.set_defaults({"model": {"class_path": "bicql_lightning.BiCQLML"}})

    def _parse_ckpt_path(self) -> None:
        # Lightning would take the model class and its settings from the checkpoint: a
        # checkpoint of another model would silently switch the run to that model.
        config = self.config.get(self.config.get("subcommand") or "", None)
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path and str(ckpt_path) not in SPECIAL_CKPT_PATHS and not str(ckpt_path).startswith("registry"):
            read_checkpoint(ckpt_path, _model_name(config.get("model")))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weights_only.*")
            super()._parse_ckpt_path()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        from .callbacks import ProgressLine, QuietProgressBar

        if config.get("enable_progress_bar") is not False:
            if sys.stdout.isatty():
                callbacks = [*callbacks, QuietProgressBar()]
            else:
                # A progress bar written to a file shows up only at the end: plain lines instead.
                config["enable_progress_bar"] = False
                callbacks = [*callbacks, ProgressLine()]
        return super()._instantiate_trainer(config, callbacks)


def _model_name(model: Any) -> str | None:
    """The ``model_name`` checkpoints of the configured model class carry, where it is ours."""
    class_path = getattr(model, "class_path", None) or (model.get("class_path") if isinstance(model, dict) else None)
    if not class_path:
        return None
    module_name, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return getattr(cls, "model_name", None)


def user_error(err: BaseException) -> str | None:
    """The one line to print for a mistake of the user's, or ``None`` for a bug (traceback).

    Ours are the package's data and checkpoint errors, and the ``ValueError``/``TypeError``
    our constructors and checks raise, wherever Lightning or jsonargparse wrapped them.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, argparse.ArgumentError):
            return config_error(str(err))
        if isinstance(err, (DatasetError, CheckpointError)):
            return str(err)
        if isinstance(err, (ValueError, TypeError)) and _raised_in_package(err):
            return str(err)
        err = err.__cause__ or err.__context__
    return None


def config_error(message: str) -> str:
    """jsonargparse's report of a bad configuration (many lines, the cause deep inside) as one line."""
    unknown = re.search(r"Option '([^']+)' is not accepted", message)
    owner = re.search(r"class_path '([^']+)'", message)
    if unknown:
        where = owner.group(1).rpartition(".")[2] if owner else "this part of the configuration"
        return (f"{where} has no setting {unknown.group(1)!r}: check its spelling; "
                "`bicql fit --print_config` lists every setting with its default")
    keys = re.findall(r'Parser key "([^"]+)":\s*\n\s*(.+)', message)
    if len(keys) > 1:  # a bad value of a nested class's setting: name it, not the union around it
        key, detail = keys[-1]
        where = owner.group(1).rpartition(".")[2] + " " if owner else ""
        return f"{where}setting {key!r}: {detail.strip()} (`bicql fit --print_config` lists every setting)"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line.lstrip("- ") for line in lines[1:] if not line.startswith(("Subtypes", "Errors", "Given"))),
                  "")
    return " ".join([*lines[:1], detail]).strip() + " (`bicql fit --help` lists the options)"


def _raised_in_package(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


def quiet_lightning() -> None:
    """Drop what our own runs would print but that says nothing about them."""

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in record.getMessage()

    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    # Raised inside Lightning's and torch's own code on every run, not by anything configured.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*weights_only.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(HELP, end="")
        raise SystemExit(0)
    if args[0] == "dataset":
        from .datasets import main as dataset_main

        raise SystemExit(dataset_main(args[1:]))
    show_traceback = "--traceback" in args or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--traceback"]
    quiet_lightning()
    try:
        # The module owns its two optimizers (manual optimisation): no CLI-level optimizer.
        # exit_on_error=False: a bad configuration raises, to be reported in one line below.
        parser_kwargs = {"exit_on_error": False, **{sub: {"exit_on_error": False}
                                                    for sub in ("fit", "validate", "test", "predict")}}
        BiCQLCLI(LightningModule, OfflineIRLDataModule, subclass_mode_model=True, args=args,
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                 parser_kwargs=parser_kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - sorted into the user's mistakes and bugs below
        message = None if show_traceback else user_error(err)
        if message is None:
            raise
        first = " ".join(message.split())  # one line, whatever the message's layout
        print(f"bicql: error: {first}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
