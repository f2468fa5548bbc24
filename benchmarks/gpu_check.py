"""The prepared GPU check: each full-size model of ``configs/`` for a fixed number of training steps under bf16, and
one generation batch — step time, samples/s and peak memory — printed as one table.

For each of ``vae`` (the discriminator on from the first step: its most expensive phase), ``reid_latent``,
``reid_pixel``, ``ef_pixel``, ``lidm`` and ``lvdm``, the module is built from ``configs/<name>.yaml`` at its real widths
and trained by a Lightning ``Trainer`` (``precision: bf16-mixed``, one device) on batches of the shared batch contract
at the config's batch size, clip length and frame size (random data: this measures the hardware, not a dataset).
Variants: ``eager``; ``compile`` (``torch.compile`` of the denoiser, diffusion models); ``channels_last`` (the 2-D and
3-D CNNs: VAE, re-ID, R(2+1)D). With two CUDA devices, one ``lvdm`` DDP row (2 processes, the same per-device batch).
``generate``: one batch of ``configs/generate.yaml`` — anatomy frames, then videos of its length in windows of the
training clip, its steps and guidance — decoded by the full-size VAE.

    python benchmarks/gpu_check.py                      # on a CUDA machine (sized for ≤ 8 min on one H100/H200)
    python benchmarks/gpu_check.py --dry-run            # CPU: every config once at its real widths, 1 step

``--dry-run`` keeps real widths but takes one step per config on the smallest batch it trains on (``DRY_RUN``:
re-ID needs two patients and two frames), generates one 4-frame video in 2 steps, and runs in fp32: on a CPU without
bfloat16 units (these machines) bf16 convolutions fall back to slow kernels (the full VAE's forward of one 112² frame:
1.6 s in fp32, 260 s under bf16 autocast). bf16 on CPU is tested with tiny models (tests/test_mixed_precision.py).
Of the variants it runs ``channels_last`` on ``reid_latent`` only, and no ``compile`` (inductor on CPU compiles for
minutes) or DDP. The suite runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("vae", "reid_latent", "reid_pixel", "ef_pixel", "lidm", "lvdm")
DRY_RUN = {"vae": (1, 1), "reid_latent": (2, 2), "reid_pixel": (2, 2), "ef_pixel": (2, 4), "lidm": (1, 1),
           "lvdm": (1, 4)}  # (batch, frames); EF needs 2 videos for a finite train/r2
VARIANTS = {"vae": ("eager", "channels_last"), "reid_latent": ("eager", "channels_last"),
            "reid_pixel": ("eager", "channels_last"), "ef_pixel": ("eager", "channels_last"),
            "lidm": ("eager", "compile"), "lvdm": ("eager", "compile")}


def load_config(name: str) -> tuple[type, dict, dict]:
    """The model class, its init_args and the data section of ``configs/<name>.yaml``."""
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    module_name, class_name = raw["model"]["class_path"].rsplit(".", 1)
    return (getattr(importlib.import_module(module_name), class_name), dict(raw["model"].get("init_args") or {}),
            dict(raw.get("data") or {}))


def build(name: str):
    cls, init_args, data = load_config(name)
    if name == "vae":
        init_args["disc_start_step"] = 0
    if name == "ef_pixel":
        init_args["output_bias"] = 50.0  # the mean EF the DataModule would give
    return cls(**init_args), data


def contract_batch(module, data: dict, batch_size: int, max_frames: int | None, step: int) -> dict:
    """A batch of the shared contract at the config's shapes: ``video (B, T, C, H, W)``, ``ef``, ``fps``, ``index``,
    ``patient`` (every item its own patient), new indices every step."""
    import torch

    hp = module.hparams
    latent = data.get("space") == "latent"
    frames = data.get("num_frames", 4) if data.get("sampling") == "frames" else data.get("clip_length", 16)
    frames = min(frames, max_frames) if max_frames else frames
    channels = 4 if latent else int(hp.get("in_channels", 1))
    size = 14 if latent else int(data.get("size", 112))
    generator = torch.Generator().manual_seed(step)
    video = torch.randn(batch_size, frames, channels, size, size, generator=generator)
    video = video if latent else video.clamp(-1, 1)
    index = torch.arange(batch_size) + step * batch_size
    return {"video": video, "ef": 10 + 80 * torch.rand(batch_size, generator=generator),
            "fps": torch.full((batch_size,), float(data.get("fps") or 32.0)), "index": index, "patient": index}


def train_row(name: str, variant: str, args) -> dict:
    """Time ``args.steps`` steps (after ``args.warmup``) of one config under one variant."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, Dataset

    cuda = torch.cuda.is_available() and not args.dry_run
    L.seed_everything(0, verbose=False)
    module, data = build(name)
    batch_size, max_frames = DRY_RUN[name] if args.dry_run else (int(data.get("batch_size", 8)), None)
    count = args.warmup + args.steps
    batches = [contract_batch(module, data, batch_size, max_frames, step) for step in range(count)]
    if variant == "channels_last":
        three_d = batches[0]["video"].ndim == 5 and name == "ef_pixel"
        module = module.to(memory_format=torch.channels_last_3d if three_d else torch.channels_last)
    if variant == "compile":
        module.unet.compile()

    class Batches(Dataset):
        def __len__(self) -> int:
            return count

        def __getitem__(self, i: int) -> dict:
            return batches[i]

    times: list[float] = []

    class Timer(L.Callback):
        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.start = self._now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            times.append(self._now() - self.start)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=args.devices, precision=args.precision,
                        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        strategy="ddp" if args.devices > 1 else "auto", callbacks=[Timer()])
    trainer.fit(module, train_dataloaders=DataLoader(Batches(), batch_size=None))
    finite = all(bool(torch.isfinite(value).all()) for value in trainer.callback_metrics.values())
    timed = times[args.warmup:] or times
    median = statistics.median(timed)
    frames = batches[0]["video"].shape[1]
    return {"config": name, "variant": variant + (f" ×{args.devices} DDP" if args.devices > 1 else ""),
            "parameters_m": sum(p.numel() for p in module.parameters()) / 1e6,
            "batch": f"{batch_size} × {frames}", "step_ms": 1e3 * median,
            "samples_per_s": batch_size * args.devices / median,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "finite": finite, "rank": trainer.global_rank}


def generation_row(args) -> dict:
    """One batch of ``configs/generate.yaml``: anatomy reference frames, then the videos, decoded by the VAE."""
    import torch

    from lightning_modules.diffusion_sampling import generate_requested
    from lightning_modules.vae_utils import decode_frames

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    writer = yaml.safe_load((REPO / "configs" / "generate.yaml").read_text())["trainer"]["callbacks"][0]["init_args"]
    count = 1 if args.dry_run else int(yaml.safe_load((REPO / "configs" / "generate.yaml").read_text())
                                       ["data"]["batch_size"])
    num_frames, steps = (4, 2) if args.dry_run else (int(writer["num_frames"]), int(writer["steps"]))
    torch.manual_seed(0)
    video, _ = build("lvdm")
    anatomy, _ = build("lidm")
    vae, _ = build("vae")
    window = 4 if args.dry_run else 64  # the training clip (configs/lvdm.yaml: 64 frames)
    for model, frames in ((video, window), (anatomy, 1)):
        model.train_num_frames.fill_(frames)
        model.train_fps.fill_(32.0)
        model.latent_shape.copy_(torch.tensor([4, 14, 14]))
        model.to(device)
    vae = vae.vae.to(device).eval()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
        latents = generate_requested(video, anatomy, torch.full((count,), 55.0), list(range(count)),
                                     num_frames=num_frames, steps=steps, scheduler=writer["sampler"],
                                     guidance_scale=float(writer["guidance_scale"]))
        with torch.no_grad():
            pixels = decode_frames(vae, latents)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert torch.isfinite(pixels).all(), "generation produced non-finite pixels"
    return {"config": "generate", "variant": f"{writer['sampler']} {steps} steps, guidance {writer['guidance_scale']}",
            "parameters_m": sum(p.numel() for m in (video, anatomy) for p in m.parameters()) / 1e6,
            "batch": f"{count} × {num_frames}", "step_ms": 1e3 * seconds, "samples_per_s": count / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "finite": True}


def ddp_row(args) -> dict | None:
    """``lvdm`` on 2 devices, in a child process (Lightning's DDP launcher re-runs the child's command per rank)."""
    command = [sys.executable, __file__, "--ddp-child", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    rows = [json.loads(line[4:]) for line in result.stdout.splitlines() if line.startswith("ROW ")]
    if result.returncode != 0 or not rows:
        print(f"DDP row failed (exit {result.returncode}):\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return rows[0]


def table(rows: list[dict], device: str, precision: str) -> str:
    lines = [f"GPU check, {time.strftime('%Y-%m-%d')}, {device}, {precision}", "",
             "| config | variant | params (M) | batch × frames | ms / step | samples / s | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        peak = "–" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        lines.append(f"| {row['config']} | {row['variant']} | {row['parameters_m']:.1f} | {row['batch']} | "
                     f"{row['step_ms']:.0f} | {row['samples_per_s']:.2f} | {peak} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, cuDNN autotune)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS) + ["generate"], help="rows to run")
    parser.add_argument("--dry-run", action="store_true", help="CPU, one step per row, batch ≤ 2, short clips")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) and rows (JSON) here")
    parser.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.devices = 2 if args.ddp_child else 1
    if args.dry_run:
        args.steps, args.warmup = 1, 0
    args.precision = "32-true" if args.dry_run else "bf16-mixed"
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
    sys.path.insert(0, str(REPO))
    import torch

    if args.ddp_child:
        row = train_row("lvdm", "eager", args)
        if row.pop("rank") == 0:
            print("ROW " + json.dumps(row), flush=True)
        return 0
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name() if cuda else f"CPU dry run ({os.cpu_count()} cores)"
    rows, began = [], time.perf_counter()
    for name in args.configs:
        if name == "generate":
            rows.append(generation_row(args))
        else:
            for variant in VARIANTS[name]:
                if args.dry_run and variant != "eager" and (variant, name) != ("channels_last", "reid_latent"):
                    continue
                row = train_row(name, variant, args)
                row.pop("rank")
                rows.append(row)
        print(f"done: {name} ({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
    if cuda and torch.cuda.device_count() >= 2 and "lvdm" in args.configs:
        row = ddp_row(args)
        if row is not None:
            rows.append(row)
    text = table(rows, device, args.precision) + f"\n\n{time.perf_counter() - began:.0f} s in all"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.md").write_text(text + "\n")
        (args.out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
