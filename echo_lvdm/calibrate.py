"""``echo-lvdm calibrate``: the privacy threshold τ of a re-ID model under one comparison protocol, on a real dataset,
stored beside the checkpoint (``<checkpoint>.calibrations.json``) where ``evaluate`` and the synthetic dataset writer
find it.

τ = the ``--quantile`` of the held-out split's best re-ID scores (head logits) against the training split, every video
reduced to the protocol's frames (:mod:`lightning_modules.protocols`). ``--protocol paper`` is the seed paper's:
first frames, τ from TEST → TRAIN. A latent re-ID model sees the real videos through ``--vae`` (posterior mean ×
scaling factor), as ``evaluate`` and the writer do.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reid", type=Path, required=True, help="ReIDModule checkpoint")
    parser.add_argument("--real", "--data.root", dest="real", type=Path, required=True,
                        help="real EchoNet-layout folder: TRAIN is the bank, --heldout calibrates")
    parser.add_argument("--vae", type=Path, help="exported VAE folder; needed by a latent re-ID model")
    parser.add_argument("--protocol", default="clip:16", help="first_frame, paper (first frames, τ from TEST), frames:N, "
                        "clip:L, clip:L/pP, clip:L@Ffps (default clip:16)")
    parser.add_argument("--heldout", choices=["VAL", "TEST"], help="split τ is calibrated on (default VAL; TEST for "
                        "--protocol paper)")
    parser.add_argument("--quantile", type=float, help="of τ (default: the re-ID model's, 0.95)")
    parser.add_argument("--rule", choices=["conformal", "linear"],
                        help="τ = the ⌈(n+1)q⌉-th smallest held-out score (conformal: a new video exceeds it with "
                             "probability ≤ 1 − q), or the interpolated quantile (linear, the seed paper's); default "
                             "conformal, linear for --protocol paper")
    parser.add_argument("--size", type=int, help="resize frames to this before the VAE or a pixel re-ID")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, help="embedding cache (default: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    from datamodules import EchoNetDataModule
    from lightning_modules.calibration import calibrate, store_calibration
    from lightning_modules.protocols import Protocol
    from lightning_modules.reid import load_reid_encoder
    from lightning_modules.reid_embeddings import embed_split

    protocol = Protocol.parse(args.protocol)
    heldout = (args.heldout or ("TEST" if args.protocol.strip() == "paper" else "VAL")).lower()
    reid, model, channels = load_reid_encoder(args.reid, args.vae, device=args.device, command="calibrate")
    real = EchoNetDataModule(args.real, pad="reflect", channels=channels, size=args.size, batch_size=args.batch_size,
                             num_workers=0, **protocol.data_options())
    with torch.no_grad():
        bank = embed_split(model, real, "train", cache_dir=args.cache_dir)
        queries = embed_split(model, real, heldout, cache_dir=args.cache_dir)
    quantile = args.quantile if args.quantile is not None else float(reid.hparams.quantile)
    rule = args.rule or ("linear" if args.protocol.strip() == "paper" else "conformal")
    calibration = calibrate(reid, bank, queries, quantile=quantile, protocol=protocol, heldout_name=heldout,
                            weights_checksum=model.weights_checksum(), data=args.real, rule=rule)
    path = store_calibration(args.reid, calibration)
    log.info("calibrate: τ = %.6g under protocol %s (quantile %g of %d %s videos against %d TRAIN videos) → %s",
             calibration.tau, protocol.name, quantile, len(queries), heldout.upper(), len(bank), path)
    return 0
