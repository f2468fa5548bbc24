"""``echo-lvdm fit | validate | test | predict``: LightningCLI with the shared DataModule and the shared trainer setup.

The model is whatever LightningModule the config's ``model.class_path`` names; the data is always
:class:`~datamodules.EchoNetDataModule`. What every run shares lives here once, not in each config:

* **Logs land under ``trainer.default_root_dir``** (default ``logs``; each model config names its own folder). The
  default logger is a ``CSVLogger`` writing ``<default_root_dir>/version_<n>/``; a logger config
  (``configs/logger/*.yaml``) that gives no ``save_dir`` writes there too, and a wandb run without a name is named
  after the folder. Checkpoints go to the logger's ``version_<n>/checkpoints/``, as Lightning places them.
* **One checkpoint callback**, configured under ``checkpoint:`` (``--checkpoint.monitor val/auc``, ...):
  :class:`~callbacks.checkpoint.Checkpoint` with ``save_last: true``, so every fit can be resumed from
  ``last.ckpt``. It steps aside when the config's ``trainer.callbacks`` already has a ``ModelCheckpoint`` or when
  ``trainer.enable_checkpointing`` is false.
* **A fit resumes where it stopped, in the same folder**: ``--ckpt_path last`` is the newest
  ``<default_root_dir>/version_<n>/checkpoints/last.ckpt``, and a fit resumed from a checkpoint of ``version_<n>``
  logs and checkpoints into ``version_<n>`` again (:mod:`echo_lvdm.resume`). A ``--ckpt_path`` that is no file is
  refused before anything is written.
* **A command given a checkpoint says which model arguments it replaced**: LightningCLI parses a ``--ckpt_path``
  checkpoint's ``hyper_parameters`` over the config, so a model argument a config or the command line set to another
  value does not hold; each such argument is named in one warning with both values (:mod:`echo_lvdm.resume`).
* The resolved config is saved with the run (``config.yaml``, and into wandb / TensorBoard runs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.checkpoint import Checkpoint
from callbacks.config_logging import LoggerSaveConfigCallback
from datamodules import EchoNetDataModule
from datamodules.errors import UserInputError, read_yaml
from echo_lvdm import resume
from echo_lvdm.cli_errors import OneLineParser, config_paths

# A logger's save_dir left at this value is replaced by trainer.default_root_dir before the logger is built.
DEFAULT_ROOT_DIR = "${trainer.default_root_dir}"

class EchoLVDMCLI(LightningCLI):
    """LightningCLI with the shared DataModule fixed, any LightningModule selectable by ``model.class_path``, the
    shared checkpoint callback and logs under ``trainer.default_root_dir`` (see the module's docs)."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        # config.yaml in the log dir (rewritten by a run in the same dir), and the same config in wandb / TensorBoard.
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", OneLineParser)  # a parse error is one line, as every user error
        self._model_arguments_given = resume.model_arguments_given(sys.argv[1:] if args is None else list(args))
        super().__init__(
            model_class=None,
            datamodule_class=EchoNetDataModule,
            subclass_mode_model=True,
            args=list(args) if args is not None else None,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.save_last": True,
            "trainer.default_root_dir": "logs",
            "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": DEFAULT_ROOT_DIR, "name": ""}},
        })

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is None:  # logger: false / true
                continue
            if getattr(init_args, "save_dir", None) in (None, DEFAULT_ROOT_DIR):
                init_args.save_dir = root
            if logger.class_path.endswith("WandbLogger") and not getattr(init_args, "name", None):
                init_args.name = Path(root).name
        if self.subcommand == "fit" and config.get("ckpt_path"):
            self._resume_into_run_folder(config, root)

    def _parse_ckpt_path(self) -> None:
        # Before LightningCLI reads the checkpoint's hyperparameters: resolve `last`, and refuse a path that is no
        # (whole) checkpoint with one line naming it, before anything is built or written.
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            config = self.config[subcommand]
            config.ckpt_path = resume.checked_checkpoint(config.ckpt_path, config.trainer.default_root_dir)
            given = config.model.clone().as_dict() if config.get("model") is not None else {}
            super()._parse_ckpt_path()
            restored = self.config[subcommand].model
            replaced = resume.replaced_model_arguments(given, restored.clone().as_dict() if restored else {},
                                                       self._model_arguments_given)
            if replaced:
                rank_zero_warn(f"--ckpt_path {config.ckpt_path}: the checkpoint's model arguments replace the ones "
                               f"the configs and the command line set (LightningCLI restores a checkpoint's "
                               f"hyper_parameters): {'; '.join(replaced)}. To run with other model arguments, edit "
                               f"hyper_parameters in a copy of the checkpoint", category=UserWarning)
            return
        super()._parse_ckpt_path()

    def _resume_into_run_folder(self, config, root: str) -> None:
        """The run folder's loggers (save_dir = default_root_dir, no name, no version) continue the checkpoint's
        ``version_<n>``; the CSV log's rows from before the checkpoint are kept (see :meth:`before_fit`)."""
        version = resume.run_version(config.ckpt_path, root)
        if version is None:
            return
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is None or logger.class_path.endswith("WandbLogger"):
                continue
            if str(init_args.save_dir) == str(root) and not getattr(init_args, "name", None) and \
                    getattr(init_args, "version", None) is None:
                init_args.version = version
        step = torch.load(config.ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0)
        self._kept_log = resume.logged_before(Path(root) / f"version_{version}", step)

    _kept_log = None

    def before_fit(self) -> None:
        logger = self.trainer.logger
        if self._kept_log is not None and isinstance(logger, CSVLogger) and logger.version is not None and \
                self.trainer.is_global_zero:
            resume.restore_rows(logger.experiment, *self._kept_log)

    def before_predict(self) -> None:
        from callbacks.latent_cache import LatentCacheWriter

        ckpt_path = self.config["predict"].get("ckpt_path")
        for callback in self.trainer.callbacks:
            if isinstance(callback, LatentCacheWriter) and ckpt_path and callback.ckpt_path is None:
                callback.ckpt_path = str(ckpt_path)  # the weights Lightning loads after the callbacks' setup

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        # The shared checkpoint steps aside for a config's own ModelCheckpoint, and when checkpointing is off.
        own = config.get("callbacks") or []
        own = own if isinstance(own, list) else [own]
        if config.get("enable_checkpointing") is False or any(isinstance(c, ModelCheckpoint) for c in own):
            callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
        return super()._instantiate_trainer(config, callbacks)


def run(argv: Sequence[str] | None) -> int:
    """Run one LightningCLI command. ``argv`` None: LightningCLI reads ``sys.argv`` itself (it warns when also handed
    args, so they are passed only when called from Python)."""
    problem = overlay_without_model(sys.argv[1:] if argv is None else argv)
    if problem:
        raise UserInputError(problem)
    cli = EchoLVDMCLI(args=argv)
    _finish_wandb_run(cli.trainer)
    _close_process_group()
    return 0


def overlay_without_model(args: Sequence[str]) -> str | None:
    """A stack of configs that changes a model but names none (no ``model.class_path``, no ``--model``): an overlay
    such as ``lvdm_quickstart.yaml`` given without the model config it changes. Returns what to say, or None.
    (LightningCLI would report it as a LightningModule that does not accept the overlay's arguments.)"""
    args = list(args)
    paths = [Path(path) for path in config_paths(args)]
    contents = [(path, read_yaml(path) or {}) for path in paths if path.is_file()]  # malformed YAML: names the file
    if any(arg == "--model" or arg.startswith(("--model=", "--model.class_path")) for arg in args):
        return None
    models = [(path, content["model"]) for path, content in contents if isinstance(content.get("model"), dict)]
    if not models or any("class_path" in model for _, model in models):
        return None
    overlay = models[0][0]
    base = overlay.with_name(overlay.name.replace("_quickstart", ""))
    hint = (f"; stack it after the model config it changes: --config {_shown(base)} --config {_shown(overlay)}"
            if base != overlay and base.is_file() else "; stack it after the model config it changes")
    return f"{_shown(overlay)} changes a model, but no config names one (model.class_path){hint}"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _close_process_group() -> None:
    """A DDP command's process group ends with the command. Lightning leaves it open, and a Gloo group left to the
    interpreter's exit can abort the process after the work is done (SIGABRT, "terminate called without an active
    exception"). Reached only when the command succeeded on this rank: other ranks may still wait on a failed one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _finish_wandb_run(trainer) -> None:
    """A command's wandb run ends with the command. Lightning leaves the run open (fit then test in one run), and wandb
    would hand it to the next WandbLogger of the process: a second main() in a notebook or test would log there.
    (Not ``wandb.teardown()``: after it, no run can start in this process.)"""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        if wandb.run is not None:  # rank 0 only: the other ranks never start one
            wandb.run.finish()
