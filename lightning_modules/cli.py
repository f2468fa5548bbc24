"""The ``echo-lvdm`` console script.

``fit | validate | test | predict`` are LightningCLI subcommands: the model is whatever LightningModule the config's
``model.class_path`` names, the data is always :class:`~datamodules.EchoNetDataModule`, configs stack left to right
(``--config a.yaml --config b.yaml``), ``--print_config`` prints the resolved config and ``--ckpt_path`` resumes.
Plain commands (``phantom``, ``inspect``, ``export-vae``, ``sample``, ``evaluate``, ``pipeline``) are argparse programs beside them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from lightning.pytorch.cli import LightningCLI

LIGHTNING_COMMANDS = {
    "fit": "train a model (model.class_path picks which) on the EchoNetDataModule",
    "validate": "run one validation loop",
    "test": "evaluate on the test split",
    "predict": "run predict (latent cache, synthetic datasets, …) through the config's writer callbacks",
}


@dataclass(frozen=True)
class PlainCommand:
    """A plain subcommand: ``module`` provides ``add_arguments(parser)`` and ``run(namespace) -> exit code``.

    Imported only when called, so ``echo-lvdm fit`` does not import the phantom renderer and ``phantom`` does not
    import Lightning's CLI machinery.
    """

    help: str
    module: str
    add_arguments: str
    run: str

    def __call__(self, name: str, argv: Sequence[str]) -> int:
        module = importlib.import_module(self.module)
        parser = argparse.ArgumentParser(prog=f"echo-lvdm {name}", description=self.help)
        getattr(module, self.add_arguments)(parser)
        return getattr(module, self.run)(parser.parse_args(argv))


PLAIN_COMMANDS = {
    "phantom": PlainCommand(
        "write a procedural echo dataset (EchoNet-Dynamic layout, with ground truth)",
        "datamodules.phantom.generate", "add_phantom_arguments", "run_phantom",
    ),
    "inspect": PlainCommand(
        "check an EchoNet-layout folder (or its latent cache) through the DataModule and print a summary",
        "datamodules.summary", "add_inspect_arguments", "run_inspect",
    ),
    "export-vae": PlainCommand(
        "export a trained VAE checkpoint as a diffusers AutoencoderKL folder",
        "lightning_modules.export", "add_export_arguments", "run_export",
    ),
    "sample": PlainCommand(
        "generate videos at requested EFs with a trained diffusion model (and read their EF back)",
        "lightning_modules.sample_cli", "add_sample_arguments", "run_sample",
    ),
    "pipeline": PlainCommand(
        "phantom → VAE → latents → re-ID → EF → anatomy → video model → filtered synthetic dataset → report",
        "lightning_modules.pipeline_cli", "add_pipeline_arguments", "run_pipeline",
    ),
    "evaluate": PlainCommand(
        "coverage, memorisation and EF faithfulness of a synthetic EchoNet folder against a real one, with a report",
        "lightning_modules.evaluate_cli", "add_evaluate_arguments", "run_evaluate",
    ),
}


class EchoLVDMCLI(LightningCLI):
    """LightningCLI with the shared DataModule fixed and any LightningModule selectable by ``model.class_path``."""

    def __init__(self, args: Sequence[str] | None = None, **kwargs) -> None:
        from callbacks.config_logging import LoggerSaveConfigCallback
        from datamodules.datamodule import EchoNetDataModule

        # config.yaml in the log dir (rewritten by a run in the same dir), and the same config in wandb / TensorBoard.
        kwargs.setdefault("save_config_callback", LoggerSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            model_class=None,
            datamodule_class=EchoNetDataModule,
            subclass_mode_model=True,
            args=list(args) if args is not None else None,
            **kwargs,
        )


def _usage() -> str:
    lines = ["usage: echo-lvdm <command> [options]", "", "Lightning commands (echo-lvdm <command> --help for every option):"]
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "Tools:"]
    lines += [f"  {name:<10} {command.help}" for name, command in PLAIN_COMMANDS.items()]
    lines += ["", "Example: echo-lvdm fit --config configs/data/phantom.yaml --config configs/vae_quickstart.yaml"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command = argv[0]
    if command in PLAIN_COMMANDS:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return PLAIN_COMMANDS[command](command, argv[1:])
    if command not in LIGHTNING_COMMANDS:
        print(f"echo-lvdm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # LightningCLI reads sys.argv itself, and warns when also handed args, so pass them only from Python.
    cli = EchoLVDMCLI(args=None if from_command_line else argv)
    _finish_wandb_run(cli.trainer)
    _close_process_group()
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
