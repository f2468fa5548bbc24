"""``echo-lvdm export-vae``: a trained VAE checkpoint → a diffusers ``AutoencoderKL`` folder (safetensors)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="VAEModule checkpoint (echo-lvdm fit output)")
    parser.add_argument("--out", type=Path, required=True, help="folder for AutoencoderKL.from_pretrained")


def run(args: argparse.Namespace) -> int:
    from lightning_modules.vae import export_vae

    if not args.checkpoint.is_file():
        log.error("export-vae: %s: no such checkpoint", args.checkpoint)
        return 1
    out = export_vae(args.checkpoint, args.out)
    log.info("export-vae: %s → %s (load with diffusers.AutoencoderKL.from_pretrained)", args.checkpoint, out)
    return 0
