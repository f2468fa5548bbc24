"""``VAEModule``: the frame autoencoder every later model works in (a diffusers ``AutoencoderKL``, trained as in SD),
plus :func:`export_vae` (checkpoint → diffusers folder) and :func:`checksum_of_weights` (the latent cache's key).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from datamodules.sampler import global_seed
from lightning_modules.checkpoints import load_module
from lightning_modules.image_logging import image_grid, log_image, to_uint8
from lightning_modules.components import NLayerDiscriminator, hinge_discriminator_loss, hinge_generator_loss
from lightning_modules.vae_utils import checksum_of_weights, frames_per_call, latent_stats, scale_from_stats

__all__ = ["VAEModule", "checksum_of_weights", "export_vae"]

_POSTERIOR_STREAM = 5  # SeedSequence tag of the posterior noise (the diffusion model's training draws use 4)
EVAL_STAGES = ("val", "test")


class VAEModule(L.LightningModule):
    """Trains an ``AutoencoderKL`` on single frames; encodes videos for the latent cache and decodes latents back.

    Batches follow the shared contract: ``video`` float32 ``(B, T, C, H, W)`` in [-1, 1]; the T frames of each clip
    are folded into the batch. Loss: ``rec_loss`` (per-pixel mean L1 or L2) + ``kl_weight`` × KL (per frame, summed
    over latent elements, averaged over frames); with ``disc_start_step`` set, a PatchGAN hinge loss is added from that
    step on, weighted adaptively as in taming-transformers / SD (gradient-norm ratio at the decoder's last layer, × ``
    disc_weight``), and training switches to manual optimisation with an autoencoder and a discriminator optimizer.

    Steps: before the discriminator starts, ``trainer.global_step`` counts training batches, so ``disc_start_step`` is
    the batch it starts at. After it starts, Lightning counts both optimizers' steps in ``global_step`` (Lightning
    issue #17958): ``max_steps`` then advances by two per batch — prefer ``max_epochs`` with the discriminator. Under
    DDP the discriminator needs ``strategy="ddp_find_unused_parameters_true"`` (each backward reaches one network).

    Scaling factor: 1/std of posterior samples (all latent elements pooled, as SD's ``scale_factor``), estimated on the
    *training* frames the model is trained on: sums are accumulated over each training epoch and finalised (summed
    over DDP ranks) at validation start and at training-epoch end, so every checkpoint carries the factor of the
    weights' own epoch. The estimate mixes the encoder's states within the epoch; for a figure from fixed weights call
    :meth:`estimate_scaling_factor`. Latent users divide/multiply by it: ``z_scaled = z × scaling_factor``.

    Args:
        in_channels … sample_size: the ``AutoencoderKL``; n ``block_out_channels`` entries downsample by 2^(n-1)
            (112² → 14² with four); ``norm_num_groups`` must divide every entry.
        lr, betas: Adam for the autoencoder, and for the discriminator unless ``disc_lr`` is given.
        rec_loss: per-pixel mean ``"l1"`` or ``"l2"``. kl_weight: weight of the per-frame KL sum. SD's 1e-6 multiplies
            a per-frame *sum* of pixel losses, so the same number here is a C·H·W times stronger prior.
        disc_start_step: batch at which the discriminator and the GAN loss start (None: no discriminator).
            disc_weight, disc_channels, disc_layers: GAN weight and PatchGAN size (input ≥ 3·2^disc_layers px).
        num_logged_frames: frames in the per-epoch reconstruction picture (originals above reconstructions).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        latent_channels: int = 4,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        mid_block_add_attention: bool = True,
        sample_size: int = 112,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.9),
        rec_loss: Literal["l1", "l2"] = "l1",
        kl_weight: float = 1e-6,
        disc_start_step: int | None = None,
        disc_weight: float = 0.5,
        disc_lr: float | None = None,
        disc_channels: int = 64,
        disc_layers: int = 3,
        num_logged_frames: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        bad_groups = [c for c in block_out_channels if c % norm_num_groups]
        if bad_groups:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every block_out_channels entry; "
                             f"{bad_groups} of {list(block_out_channels)} are not multiples")
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        levels = len(block_out_channels)
        self.vae = AutoencoderKL(
            in_channels=in_channels,
            out_channels=out_channels,
            latent_channels=latent_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=mid_block_add_attention,
            sample_size=sample_size,
            scaling_factor=1.0,
        )
        # Kept outside self.vae: the exported / frozen autoencoder never carries the discriminator.
        self.discriminator = (
            NLayerDiscriminator(out_channels, disc_channels, disc_layers) if disc_start_step is not None else None
        )
        self.automatic_optimization = self.discriminator is None
        self.register_buffer("scaling_factor", torch.tensor(1.0))
        # A plain attribute, not a buffer: precision plugins ("16-true") must not cast the float64 sums.
        self._latent_sums: torch.Tensor | None = None
        self.psnr = nn.ModuleDict({stage: PeakSignalNoiseRatio(data_range=2.0) for stage in EVAL_STAGES})
        self.ssim = nn.ModuleDict({stage: StructuralSimilarityIndexMeasure(data_range=2.0) for stage in EVAL_STAGES})

    # ---------------------------------------------------------------------------------------------- training
    def _adversarial_now(self) -> bool:
        start = self.hparams.disc_start_step
        return start is not None and self.global_step >= start

    def _adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """taming/SD: balance the GAN gradient against the reconstruction gradient at the decoder's output layer."""
        last_layer = self.vae.decoder.conv_out.weight
        rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach() * self.hparams.disc_weight

    def _posterior_noise(self, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Noise for a posterior sample ``like`` the latents (items × frames, C, h, w), drawn per item from (seed, epoch,
        index) — not from the global RNG, which a resumed fit does not restore and which differs between DDP ranks."""
        seed, epoch = global_seed(), self.current_epoch
        per_item = (len(like) // len(index), *like.shape[1:])
        noise = []
        for key in index.tolist():
            state = np.random.SeedSequence((seed, epoch, key, _POSTERIOR_STREAM)).generate_state(1, np.uint64)[0]
            noise.append(torch.randn(per_item, generator=torch.Generator().manual_seed(int(state))))
        return torch.cat(noise).to(like)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        """Encode, decode and score the batch's frames; returns ``loss``, ``frames`` and ``recon`` ``(N, C, H, W)``."""
        frames = batch["video"].flatten(0, 1)
        posterior = self.vae.encode(frames).latent_dist
        # Training decodes a posterior sample (the VAE objective); evaluation the mode, as latents are used later.
        latents = posterior.mean + posterior.std * self._posterior_noise(batch["index"], posterior.mean) \
            if stage == "train" else posterior.mode()
        recon = self.vae.decode(latents).sample
        distance = F.l1_loss if self.hparams.rec_loss == "l1" else F.mse_loss
        rec_loss = distance(recon, frames)
        kl = posterior.kl().mean()
        loss = rec_loss + self.hparams.kl_weight * kl
        logs = {"rec_loss": rec_loss, "kl": kl}
        if stage == "train":
            self._accumulate_latent_stats(latents.detach())
            if self._adversarial_now():
                logs["g_loss"] = hinge_generator_loss(self.discriminator(recon))
                loss = loss + self._adaptive_weight(rec_loss, logs["g_loss"]) * logs["g_loss"]
        else:
            # Metrics score what users get: decoded pixels clamped to the data range.
            clamped = recon.clamp(-1.0, 1.0)
            self.psnr[stage](clamped, frames)
            self.ssim[stage](clamped, frames)
            logs |= {"psnr": self.psnr[stage], "ssim": self.ssim[stage]}
        logs["loss"] = loss
        for name, value in logs.items():
            # Evaluation losses are epoch means: average them over DDP ranks too (metrics sync themselves).
            sync = stage != "train" and isinstance(value, torch.Tensor)
            self.log(f"{stage}/{name}", value, batch_size=len(frames), prog_bar=name in ("loss", "psnr"), sync_dist=sync)
        return {"loss": loss, "frames": frames, "recon": recon}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if self.automatic_optimization:
            return self._shared_step(batch, "train")["loss"]
        opt_ae, opt_d = self.optimizers()
        adversarial = self._adversarial_now()  # read before stepping: the step advances global_step
        with self.toggled_optimizer(opt_ae):
            out = self._shared_step(batch, "train")
            opt_ae.zero_grad(set_to_none=True)
            self.manual_backward(out["loss"])
            opt_ae.step()
        if adversarial:
            with self.toggled_optimizer(opt_d):
                real = self.discriminator(out["frames"].detach())
                fake = self.discriminator(out["recon"].detach())
                d_loss = hinge_discriminator_loss(real, fake)
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                opt_d.step()
            self.log("train/d_loss", d_loss, batch_size=len(out["frames"]))
        return None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._shared_step(batch, "val")
        if batch_idx == 0 and not self.trainer.sanity_checking:
            n = self.hparams.num_logged_frames
            grid = image_grid([out["frames"][:n], out["recon"][:n]])  # originals above reconstructions
            log_image(self.trainer, "val/reconstructions", grid, step=self.global_step)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        opt_ae = torch.optim.Adam(_trainable(self.vae), lr=hp.lr, betas=tuple(hp.betas))
        if self.discriminator is None:
            return opt_ae
        opt_d = torch.optim.Adam(_trainable(self.discriminator), lr=hp.disc_lr or hp.lr, betas=tuple(hp.betas))
        return [opt_ae, opt_d]

    # ------------------------------------------------------------------------------------------ scaling factor
    def _accumulate_latent_stats(self, latents: torch.Tensor) -> None:
        sums = latent_stats(latents)
        self._latent_sums = sums if self._latent_sums is None else self._latent_sums.to(sums.device) + sums

    def _finalise_scaling_factor(self) -> None:
        """Sum this epoch's latent statistics over ranks and store 1/std. Collective: called on every rank."""
        sums = self._latent_sums
        if sums is None:  # nothing trained yet this epoch (sanity check, validate-only): keep the factor
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        sums = sums.to(self.device)
        sums = self.trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        if sums[2] > 1:
            self.scaling_factor.fill_(scale_from_stats(sums))

    def on_train_epoch_start(self) -> None:
        self._latent_sums = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The epoch's latent statistics so far, summed over ranks (every rank saves, so this collective is safe): a
        # fit resumed inside the epoch finalises the factor of the whole epoch, as an uninterrupted one.
        sums = self._latent_sums
        if sums is None:
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        sums = sums.to(self.device)
        if self._trainer is not None:
            sums = self.trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        checkpoint["vae_latent_sums"] = sums.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        sums = checkpoint.get("vae_latent_sums")
        rank = self.trainer.global_rank if self._trainer is not None else 0
        # Rank 0 carries the pooled sums on; the others start from zero, so the next reduction counts them once.
        self._latent_sums = None if sums is None or not sums[2] else sums.to(torch.float64) * (rank == 0)

    def on_validation_epoch_start(self) -> None:
        # Validation (and the checkpoint after it) can come before on_train_epoch_end: finalise what we have.
        self._finalise_scaling_factor()

    def on_train_epoch_end(self) -> None:
        self._finalise_scaling_factor()
        self.log("train/scaling_factor", self.scaling_factor.float(), sync_dist=True)  # equal on every rank

    @torch.no_grad()
    def estimate_scaling_factor(self, dataloader: Iterable[dict[str, torch.Tensor]], *, max_batches: int | None = None,
                                chunk_size: int | None = None, update: bool = True) -> float:
        """1/std of posterior samples of the frames of ``dataloader`` (batch-contract dicts) with the current weights.

        Reads at most ``max_batches`` batches, on this process only (no DDP reduction). ``update`` stores the result
        in the ``scaling_factor`` buffer. Returns the factor.
        """
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            mean, logvar = self.encode_frames(batch["video"].flatten(0, 1).to(self.device), chunk_size=chunk_size)
            sums += latent_stats(mean + torch.exp(0.5 * logvar) * torch.randn_like(mean))
        if sums[2] < 2:
            raise ValueError("estimate_scaling_factor: the dataloader yielded no frames")
        scale = scale_from_stats(sums)
        if update:
            self.scaling_factor.fill_(scale)
        return scale

    # ------------------------------------------------------------------------------------ encoding / decoding
    @contextmanager
    def _inference(self):
        was_training = self.vae.training
        self.vae.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.vae.train(was_training)

    def encode_frames(self, frames: torch.Tensor, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames ``(N, C, H, W)`` in [-1, 1] → posterior ``(mean, logvar)``, each float32 ``(N, latent, h, w)``.

        Unscaled (multiply samples by ``scaling_factor`` for diffusion). ``logvar`` is clamped to [-30, 20] as diffusers
        does. Runs in eval mode without gradients, ``chunk_size`` frames at a time (default
        :func:`~lightning_modules.vae_utils.frames_per_call`) on the module's device; results are gathered on
        ``frames``' device so long videos do not pile up in accelerator memory.
        """
        means, logvars = [], []
        with self._inference():
            for chunk in frames.split(chunk_size or frames_per_call(self.device)):
                posterior = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
                means.append(posterior.mean.float().to(frames.device))
                logvars.append(posterior.logvar.float().to(frames.device))
        return torch.cat(means), torch.cat(logvars)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Latent-cache entries: ``index`` ``(B,)``; unscaled ``mean``, ``logvar`` float16 ``(B, T, latent, h, w)``."""
        video = batch["video"]
        mean, logvar = self.encode_frames(video.flatten(0, 1))
        shape = video.shape[:2]
        return {"index": batch["index"], "mean": mean.unflatten(0, shape).half(),
                "logvar": logvar.unflatten(0, shape).half()}

    def decode_latents(self, latents: torch.Tensor, *, scaled: bool = True, chunk_size: int | None = None
                       ) -> torch.Tensor:
        """Latents ``(B, T, latent, h, w)`` → uint8 frames ``(B, T, H, W)`` (grayscale) or ``(B, T, H, W, 3)`` (RGB).

        ``scaled``: the latents were multiplied by ``scaling_factor`` (diffusion outputs) and are divided by it first.
        Decodes ``chunk_size`` frames at a time (default :func:`~lightning_modules.vae_utils.frames_per_call`), so
        memory is bounded for long videos; pixels are rounded and clamped.
        The result is on ``latents``' device.
        """
        batch, time = latents.shape[:2]
        decoded = []
        with self._inference():
            for chunk in latents.flatten(0, 1).split(chunk_size or frames_per_call(self.device)):
                chunk = chunk.to(self.device, self.dtype)
                if scaled:
                    chunk = chunk / self.scaling_factor.to(chunk.dtype)
                decoded.append(to_uint8(self.vae.decode(chunk).sample).to(latents.device))
        frames = torch.cat(decoded).unflatten(0, (batch, time))  # (B, T, C, H, W)
        return frames[:, :, 0] if frames.shape[2] == 1 else frames.permute(0, 1, 3, 4, 2)

    # ---------------------------------------------------------------------------------------------- export
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``self.vae`` as a diffusers folder (safetensors) with ``scaling_factor`` in its config."""
        self.vae.register_to_config(scaling_factor=float(self.scaling_factor))
        self.vae.save_pretrained(directory, safe_serialization=True)
        return Path(directory)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    # Frozen parameters (e.g. a fine-tuning setup that froze the encoder) stay out of the optimizer.
    return [p for p in module.parameters() if p.requires_grad]


def export_vae(checkpoint: str | Path, out: str | Path) -> Path:
    """Lightning checkpoint of a :class:`VAEModule` → diffusers ``AutoencoderKL`` folder at ``out`` (returned).

    The checkpoint is read with ``weights_only=True`` (no arbitrary unpickling) onto the CPU.
    """
    module = load_module(VAEModule, checkpoint)
    return module.save_pretrained(out)
