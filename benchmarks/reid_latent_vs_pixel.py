"""Re-ID training samples per second in the VAE latent space vs on pixels: same videos, same frames, one run.

Each side trains its config's network (configs/reid_latent*.yaml: 4×14×14 latents through a stride-1 stem;
configs/reid_pixel*.yaml: 112² frames through the ImageNet stem) for the same number of steps on the same phantom
batches — data loading, forward, backward and the optimizer step, as in `echo-lvdm fit`. The latent cache is built
first with a tiny VAE (weights do not change the cost of reading it) and its build time is reported separately.
Prints the ratio; the seed paper's claim is that latent re-ID is much cheaper.

    python benchmarks/reid_latent_vs_pixel.py [--quickstart] [--steps 6] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch


def samples_per_second(module, datamodule, steps: int) -> float:
    """Frames per second through data loading + training step + backward + optimizer step (after one warm-up)."""
    optimizer = module.configure_optimizers()
    module.train()
    loader = datamodule.train_dataloader()
    batches = (batch for _ in range(steps + 1) for batch in loader)  # as many epochs as the steps need
    seen, start = 0, None
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        batch = next(batches)
        loss = module.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += batch["video"].shape[:2].numel() if step else 0
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quickstart", action="store_true", help="the small ResNet of the quickstart configs")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-frames", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a machine shared with jobs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from callbacks.latent_cache import LatentCacheWriter
    from datamodules.datamodule import EchoNetDataModule
    from datamodules.phantom import generate_phantom
    from lightning_modules.reid import ReIDModule
    from lightning_modules.vae import VAEModule

    network = (dict(layers=[1, 1, 1, 1], block="basic", width=32) if args.quickstart
               else dict(layers=[3, 4, 6, 3], block="bottleneck", width=64))
    torch.manual_seed(0)
    vae = VAEModule(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                    mid_block_add_attention=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_phantom(Path(tmp) / "phantom", patients=12, videos_per_patient=2, seed=0, frames=(48, 64))
        cache = Path(tmp) / "latents"
        start = time.perf_counter()
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                            callbacks=[LatentCacheWriter(cache)])
        trainer.predict(vae, datamodule=EchoNetDataModule(root, sampling="video", batch_size=1, predict_split="all"),
                        return_predictions=False)
        build = time.perf_counter() - start

        data = dict(sampling="frames", num_frames=args.num_frames, batch_size=args.batch_size, group_by_patient=True,
                    seed=0)
        pixel_dm = EchoNetDataModule(root, channels=1, size=112, **data)
        latent_dm = EchoNetDataModule(root, space="latent", latent_dir=cache, latent_posterior="mean", **data)
        torch.manual_seed(0)
        pixel = ReIDModule(in_channels=1, stem="imagenet", lr_schedule="constant", **network)
        latent = ReIDModule(in_channels=4, stem="small", lr_schedule="constant", **network)
        for dm in (pixel_dm, latent_dm):
            dm.setup("fit")
        pixel_rate = samples_per_second(pixel, pixel_dm, args.steps)
        latent_rate = samples_per_second(latent, latent_dm, args.steps)
        name = "quickstart ResNet (basic [1, 1, 1, 1], width 32)" if args.quickstart else "ResNet-50"
        print(f"{name}; batches of {args.batch_size} videos × {args.num_frames} frames, {args.steps} timed steps")
        print(f"latent cache build: {build:.1f} s for 24 videos (once per VAE)")
        print(f"pixel  (1×112×112): {pixel_rate:8.1f} training frames/s")
        print(f"latent (4×14×14):   {latent_rate:8.1f} training frames/s")
        print(f"ratio: {latent_rate / pixel_rate:.1f}x")


if __name__ == "__main__":
    main()
