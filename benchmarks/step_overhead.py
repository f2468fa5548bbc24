"""One diffusion training step through Lightning vs a bare diffusers + torch loop: same UNet, batch and optimizer.

Both sides start from copies of one ``VideoDiffusionModule`` (``mode="video"``, reference conditioning, EMA) and
read the same synthetic latent batch ``(B, T, 4, size, size)`` from DataLoaders over the same data. The Lightning
side is ``Trainer.fit`` (no logger, checkpointing, progress bar or summary); the bare side does by hand what
``VideoDiffusionModule._shared_step`` does in training — the per-item draws (noise, timestep, reference frame and
guidance-dropout coins from each item's own (seed, epoch, index) generator: the module's ``_train_draws``, as the
module itself calls it), ``add_noise``, v target, UNet, MSE — then ``zero_grad``, ``backward``, AdamW ``step``, the LR
schedule and the EMA step. Each step's batch carries new indices, so every step draws new noise.

The two alternate step by step in one process, so load from other jobs on a shared machine falls on both alike: after
each Lightning step a callback takes the time, runs one bare step (nothing of Lightning runs inside its timing) and
hands back. A Lightning step is the time from there to the end of the next one — its data fetch, hooks, logging and
the EMA update included. Both sides draw per item from the same (seed, epoch, index), so they draw the same noise and
their losses agree: a check that the bare loop does the same work. Prints the ratio of medians (goal ≤ 1.05).

    python benchmarks/step_overhead.py --threads 1                           # tiny UNet on CPU
    python benchmarks/step_overhead.py --device cuda --channels 128 256 256 512 --frames 16 --batch-size 8
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader, Dataset


class RepeatedBatch(Dataset):
    """``length`` times the same collated batch (DataLoader ``batch_size=None``: no collation cost), the i-th with
    the indices of the i-th batch of an epoch — so that its per-item draws are new."""

    def __init__(self, batch: dict[str, torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        size = len(self.batch["index"])
        return {**self.batch, "index": self.batch["index"] + index * size}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loss(module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``_shared_step(batch, "train")`` of a video model written out, with the module's per-item draws."""
    hp, latents = module.hparams, batch["video"]
    ef, fps = batch["ef"].float(), batch["fps"].float()
    batch_size, frames = latents.shape[:2]
    device = latents.device
    noise, timesteps, reference_frame, ef_coin, reference_coin = module._train_draws(batch["index"],
                                                                                     latents.shape[1:])
    noise = noise.to(latents.dtype)
    drop_ef, drop_reference = ef_coin < hp.ef_dropout, reference_coin < hp.reference_dropout
    module.train_num_frames.fill_(frames)
    module.train_fps.fill_(fps.mean())
    module.latent_shape.copy_(torch.tensor(latents.shape[2:]))
    reference = latents[torch.arange(batch_size, device=device), reference_frame]
    reference = torch.where(drop_reference.view(-1, 1, 1, 1), torch.zeros_like(reference), reference)
    noisy = module.noise_scheduler.add_noise(latents, noise, timesteps)
    tokens, ef_ids = module.condition(ef, drop_ef)
    prediction = module.denoise(noisy, timesteps, tokens, reference, fps, ef_ids=ef_ids)
    target = module.noise_scheduler.get_velocity(latents, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1).mean()


class InterleavedBareLoop(L.Callback):
    """After every Lightning step: record its time and loss, then run and time one bare step on ``bare``."""

    def __init__(self, bare, loader: DataLoader, device: torch.device) -> None:
        self.bare, self.loader, self.device = bare, loader, device
        self.times: dict[str, list[float]] = {"lightning": [], "bare": []}
        self.losses: dict[str, list[float]] = {"lightning": [], "bare": []}

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        bare, hp = self.bare.to(self.device).train(), self.bare.hparams
        self.optimizer = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=hp.lr,
                                           weight_decay=hp.weight_decay)  # as configure_optimizers
        self.schedule = get_scheduler(hp.lr_scheduler, self.optimizer, num_warmup_steps=hp.warmup_steps,
                                      num_training_steps=len(self.loader))
        self.batches = iter(self.loader)
        self.resume = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses["lightning"].append(float(outputs["loss"]))
        self.times["lightning"].append(self._now() - self.resume)
        start = self._now()
        self.losses["bare"].append(self.bare_step())
        self.times["bare"].append(self._now() - start)
        self.resume = self._now()

    def bare_step(self) -> float:
        batch = {key: value.to(self.device, non_blocking=True) for key, value in next(self.batches).items()}
        loss = bare_loss(self.bare, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        if self.bare.ema is not None:  # VideoDiffusionModule.on_train_batch_end
            self.bare.ema.to(device=self.device)
            self.bare.ema.step(self.bare.denoiser_parameters())
        return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=14, help="latent height and width")
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64],
                        help="UNet block_out_channels (first ≤ 64: the tests' tiny UNet; else the module defaults)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 on a machine shared with jobs)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")

    from lightning_modules.diffusion import VideoDiffusionModule

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    tiny = dict(layers_per_block=1, attention_head_dim=32, cross_attention_dim=32, addition_time_embed_dim=8)
    module = VideoDiffusionModule(block_out_channels=args.channels, warmup_steps=0,
                                  **(tiny if args.channels[0] <= 64 else {}))
    generator = torch.Generator().manual_seed(args.seed)
    batch = {"video": torch.randn(args.batch_size, args.frames, 4, args.size, args.size, generator=generator),
             "ef": torch.linspace(20.0, 80.0, args.batch_size), "fps": torch.full((args.batch_size,), 50.0),
             "index": torch.arange(args.batch_size), "patient": torch.arange(args.batch_size)}
    data = RepeatedBatch(batch, args.warmup + args.steps)
    bare = InterleavedBareLoop(copy.deepcopy(module), DataLoader(data, batch_size=None), device)
    trainer = L.Trainer(max_steps=len(data), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        callbacks=[bare])
    torch.manual_seed(args.seed)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))

    per_step = {name: times[args.warmup:] for name, times in bare.times.items()}
    medians = {name: statistics.median(times) for name, times in per_step.items()}
    gap = max(abs(a - b) for a, b in zip(bare.losses["lightning"], bare.losses["bare"], strict=True))
    parameters = sum(p.numel() for p in module.unet.parameters())
    print(f"UNet {args.channels} ({parameters / 1e6:.2f} M parameters), batch ({args.batch_size}, {args.frames}, 4, "
          f"{args.size}, {args.size}), {args.device}, {torch.get_num_threads()} threads, {args.steps} timed steps "
          f"per side after {args.warmup}, interleaved")
    print(f"{'':10s} {'median':>9s} {'min':>9s} {'max':>9s}  ms/step")
    for name, label in (("bare", "bare loop"), ("lightning", "Lightning")):
        times = [1e3 * t for t in per_step[name]]
        print(f"{label:10s} {statistics.median(times):9.1f} {min(times):9.1f} {max(times):9.1f}")
    paired = statistics.median(a / b for a, b in zip(per_step["lightning"], per_step["bare"], strict=True))
    print(f"overhead: {1e3 * (medians['lightning'] - medians['bare']):+.1f} ms/step; "
          f"losses of the two sides agree to {gap:.1e}")
    ratio = medians["lightning"] / medians["bare"]
    print(f"ratio Lightning/bare: {ratio:.3f} (median of per-step ratios {paired:.3f}); goal ≤ 1.05: "
          f"{'met' if ratio <= 1.05 else 'not met'}")


if __name__ == "__main__":
    main()
