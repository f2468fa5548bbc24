"""The ``echo-lvdm`` console script (also ``python -m echo_lvdm``): one command per module of this package.

``fit | validate | test | predict`` are LightningCLI subcommands (:mod:`echo_lvdm.lightning_cli`); the plain commands
are argparse programs, each a module with ``HELP``, ``add_arguments(parser)`` and ``run(namespace) -> exit code``,
imported only when called (``echo-lvdm fit`` does not import the phantom renderer, ``phantom`` not Lightning's CLI).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from datamodules.errors import UserInputError

DEBUG_ENV = "ECHO_LVDM_DEBUG"  # set to 1: user errors show their traceback too

LIGHTNING_COMMANDS = {
    "fit": "train a model (model.class_path picks which) on the EchoNetDataModule",
    "validate": "run one validation loop",
    "test": "evaluate on the test split",
    "predict": "run predict (latent cache, synthetic datasets, …) through the config's writer callbacks",
}

PLAIN_COMMANDS = {  # command → module
    "phantom": "echo_lvdm.phantom",
    "inspect": "echo_lvdm.inspect_dataset",
    "export-vae": "echo_lvdm.export_vae",
    "sample": "echo_lvdm.sample",
    "pipeline": "echo_lvdm.pipeline",
    "evaluate": "echo_lvdm.evaluate",
    "calibrate": "echo_lvdm.calibrate",
    "audit": "echo_lvdm.audit",
}

PLAIN_HELP = {  # kept here so `echo-lvdm --help` imports no command module
    "phantom": "write a procedural echo dataset (EchoNet-Dynamic layout, with ground truth)",
    "inspect": "check an EchoNet-layout folder (or its latent cache) through the DataModule and print a summary",
    "export-vae": "export a trained VAE checkpoint as a diffusers AutoencoderKL folder",
    "sample": "generate videos at requested EFs with a trained diffusion model (and read their EF back)",
    "pipeline": "phantom → VAE → latents → re-ID → EF → anatomy → video model → filtered synthetic dataset → report",
    "evaluate": "coverage, memorisation and EF faithfulness of a synthetic EchoNet folder against a real one, with a "
                "report",
    "calibrate": "the privacy threshold τ of a re-ID model under a comparison protocol, stored beside its checkpoint",
    "audit": "does the privacy filter catch near-copies of training videos? recall per transform, false flags",
}


def run_plain(name: str, argv: Sequence[str]) -> int:
    module = importlib.import_module(PLAIN_COMMANDS[name])
    parser = argparse.ArgumentParser(prog=f"echo-lvdm {name}", description=PLAIN_HELP[name])
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def _usage() -> str:
    lines = ["usage: echo-lvdm <command> [options]", "", "Lightning commands (echo-lvdm <command> --help for every option):"]
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "Tools:"]
    lines += [f"  {name:<10} {PLAIN_HELP[name]}" for name in PLAIN_COMMANDS]
    lines += ["", "Example: echo-lvdm fit --config configs/data/phantom.yaml --config configs/vae.yaml "
                  "--config configs/quickstart/vae.yaml"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. From the console script (``argv`` None) a :class:`UserInputError` — a bad file, row, flag or
    checkpoint — or a missing file is printed as one line and exits 1 (``ECHO_LVDM_DEBUG=1``: with its traceback); called with ``argv``
    from Python, it is raised."""
    if argv is not None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return _dispatch(argv)
    try:
        return _dispatch(argv)
    except (UserInputError, FileNotFoundError) as err:
        print(f"echo-lvdm: {err}", file=sys.stderr)
        return 1


def _dispatch(argv: Sequence[str] | None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command = argv[0]
    if command in PLAIN_COMMANDS:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        return run_plain(command, argv[1:])
    if command not in LIGHTNING_COMMANDS:
        print(f"echo-lvdm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from echo_lvdm import lightning_cli

    return lightning_cli.run(None if from_command_line else argv)
