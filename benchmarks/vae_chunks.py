"""VAE encode and decode time by frames per call: the CPU default (8) against the sizes used before (64 to encode,
32 to decode), measured in one run, with the largest difference from encoding or decoding all frames at once.

The encode stage, the latent re-ID's near-copy positives, the coverage callback and the dataset writer call the VAE on
whole videos; on the CPU the activations of a few 112² frames stay in cache and larger calls spill them. The VAE has
the quickstart's geometry (configs/vae_quickstart.yaml: channels 16–64, no mid-block attention) or, with
``--full``, that of configs/vae.yaml; weights do not change the cost. Sizes are interleaved over ``--repeats`` rounds
and the median kept. Prints a table and the ratios (old default / chunks of 8; above 1: the default is faster).

    python benchmarks/vae_chunks.py [--full] [--frames 72] [--videos 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

OLD_ENCODE, OLD_DECODE = 64, 32  # the chunk sizes before frames_per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the geometry of configs/vae.yaml (channels 128–512)")
    parser.add_argument("--frames", type=int, default=72, help="frames of the encoded video (the phantom's 64–80)")
    parser.add_argument("--videos", type=int, default=8, help="16-frame videos decoded per call (a writer batch)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lightning_modules.vae import VAEModule
    from lightning_modules.vae_utils import decode_frames, encode_means, frames_per_call

    torch.manual_seed(0)
    geometry = {} if args.full else dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                                         mid_block_add_attention=False)
    vae = VAEModule(**geometry).vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=1.0)
    frames = torch.rand(args.frames, 1, 112, 112) * 2 - 1
    latents = torch.randn(args.videos, 16, 4, 14, 14)
    sizes = sorted(set(args.sizes) | {frames_per_call("cpu"), OLD_ENCODE, OLD_DECODE})
    with torch.no_grad():
        whole_mean = vae.encode(frames).latent_dist.mean
        whole_pixels = torch.cat([vae.decode(chunk).sample for chunk in latents.flatten(0, 1).split(len(frames))])
    seconds = {("encode", s): [] for s in sizes} | {("decode", s): [] for s in sizes}
    difference = {}
    for _ in range(args.repeats):
        for size in sizes:
            start = time.perf_counter()
            mean = encode_means(vae, frames, chunk_size=size)
            seconds["encode", size].append((time.perf_counter() - start) / len(frames))
            start = time.perf_counter()
            pixels = decode_frames(vae, latents, chunk_size=size).flatten(0, 1)
            seconds["decode", size].append((time.perf_counter() - start) / len(pixels))
            difference[size] = max(float((mean - whole_mean).abs().max()), float((pixels - whole_pixels).abs().max()))
    median = {key: statistics.median(values) for key, values in seconds.items()}
    print(f"VAE {'configs/vae.yaml' if args.full else 'quickstart'} geometry, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}: ms per frame")
    print("| frames per call | encode | decode | largest difference from all at once |")
    print("|---|---|---|---|")
    for size in sizes:
        print(f"| {size} | {1e3 * median['encode', size]:.2f} | {1e3 * median['decode', size]:.2f} | "
              f"{difference[size]:.1e} |")
    default = frames_per_call("cpu")
    print(f"encode: {OLD_ENCODE} / {default} frames per call = "
          f"{median['encode', OLD_ENCODE] / median['encode', default]:.2f}×; decode: {OLD_DECODE} / {default} = "
          f"{median['decode', OLD_DECODE] / median['decode', default]:.2f}×")


if __name__ == "__main__":
    main()
