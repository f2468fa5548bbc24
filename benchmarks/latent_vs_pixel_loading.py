"""Latent clips per second: read from the latent cache vs decode the AVI and encode it with the VAE on the fly.

Same clips (the DataModule's evaluation plans), same VAE (EchoNet-Synthetic-sized by default, the geometry of
configs/vae.yaml; weights do not change the cost), one run. The cache is built first and its build time reported
separately: it is paid once per VAE, the reads every epoch. Prints the ratio (goal ≥ 50×).

    python benchmarks/latent_vs_pixel_loading.py [--quickstart-vae] [--clips 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=8, help="clips timed on the slow (encode on the fly) path")
    parser.add_argument("--clip-length", type=int, default=16)
    parser.add_argument("--quickstart-vae", action="store_true", help="the tiny VAE of configs/vae_quickstart.yaml")
    args = parser.parse_args()

    from callbacks.latent_cache import LatentCacheWriter
    from datamodules.datamodule import EchoNetDataModule
    from datamodules.phantom import generate_phantom
    from lightning_modules.vae import VAEModule

    torch.manual_seed(0)
    if args.quickstart_vae:
        vae = VAEModule(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=16,
                        mid_block_add_attention=False)
    else:
        vae = VAEModule()  # 112² → 4×14×14, channels 128–512, as configs/vae.yaml
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_phantom(Path(tmp) / "phantom", patients=6, videos_per_patient=2, seed=0, frames=(48, 64))
        cache = Path(tmp) / "latents"
        start = time.perf_counter()
        writer = LatentCacheWriter(cache)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
        trainer.predict(vae, datamodule=EchoNetDataModule(root, sampling="video", batch_size=1, predict_split="all"),
                        return_predictions=False)
        build = time.perf_counter() - start

        settings = dict(clip_length=args.clip_length, period=2)
        pixel = EchoNetDataModule(root, **settings)
        latent = EchoNetDataModule(root, space="latent", latent_dir=cache, latent_posterior="mean", latent_scaled=False,
                                   **settings)
        pixel.setup("fit")
        latent.setup("fit")
        pixel_set, latent_set = pixel.datasets["train"], latent.datasets["train"]
        keys = [i % len(pixel_set) for i in range(args.clips)]

        start = time.perf_counter()
        on_the_fly = [vae.encode_frames(pixel_set[key]["video"])[0] for key in keys]
        slow = (time.perf_counter() - start) / len(keys)

        repeats = max(1, round(200 / len(keys)))
        start = time.perf_counter()
        for _ in range(repeats):
            cached = [latent_set[key]["video"] for key in keys]
        fast = (time.perf_counter() - start) / (repeats * len(keys))

        worst = max((a - b).abs().max().item() for a, b in zip(on_the_fly, cached, strict=True))
        assert worst < 5e-2, f"cached latents differ from on-the-fly encoding by {worst}"
        name = "quickstart" if args.quickstart_vae else "EchoNet-Synthetic-sized"
        print(f"{name} VAE; clips of {args.clip_length} frames (period 2) from 112² phantom videos")
        print(f"cache build: {build:.1f} s for {len(writer.encoded)} videos (once per VAE)")
        print(f"decode AVI + encode with the VAE: {1 / slow:10.2f} clips/s")
        print(f"read from the latent cache:       {1 / fast:10.2f} clips/s")
        print(f"ratio: {slow / fast:.0f}x")


if __name__ == "__main__":
    main()
