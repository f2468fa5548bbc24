"""``VideoDiffusionModule``: latent video diffusion conditioned on EF and a reference frame (EchoNet-Synthetic's LVDM),
and, in image mode, the anatomy model that generates reference frames (its LIDM) — one class, two modes."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.training_utils import EMAModel

from lightning_modules.checkpoints import load_module
from lightning_modules.metrics import IndexedCat
from lightning_modules.components.ef_conditioning import EFConditioner
from lightning_modules.diffusion_draws import biased_timestep_map, eval_noise, train_draws
from lightning_modules.diffusion_sampling import (blend_windows, denoising_loop, guided_prediction,
                                                  make_sampler, sample_inputs)
from lightning_modules.ef_weighting import ef_weights, empty_table, training_split_table
from lightning_modules.ema import DenoiserEMA
from lightning_modules.components.film import scale_shift_resnets
from lightning_modules.flow_matching import default_sampler, training_pair, training_scheduler
from lightning_modules.snr_weighting import check_snr_gamma, min_snr_weights
from lightning_modules.joint_sampling import JointSchedule, check_joint_models, frame_prediction, latent_space_of
from lightning_modules.lr_schedules import check_decay_fraction, step_schedule

__all__ = ["VideoDiffusionModule"]

class VideoDiffusionModule(DenoiserEMA, L.LightningModule):
    """Denoiser: diffusers' :class:`UNetSpatioTemporalConditionModel` (the SVD UNet) on latent clips ``(B, T, C, h, w)``
    as the DataModule serves them (``space: latent``, scaled). Objective: ``prediction_type`` (v-prediction by default)
    under a diffusers :class:`DDPMScheduler`, sampled with DDIM, DPM-Solver++, Euler or DDPM (:meth:`sample`); or, with
    ``objective="flow_matching"``, the velocity of rectified flow under a :class:`FlowMatchEulerDiscreteScheduler`,
    sampled with its Euler or DPM-Solver++ (:mod:`~lightning_modules.flow_matching`).

    Conditioning. EF → :class:`EFConditioner` token (``ef_encoding``: "timestep" or "smooth" sinusoids) →
    cross-attention (``ef_embedding="token"``); or a second added time id beside fps, embedded into the time embedding
    of every ResNet block (``"time"``, SVD's ``added_time_ids``; the cross-attention then reads the null token); or
    ``"both"``. That embedding is added (``time_embedding_norm="default"``) or scales and shifts the normalised
    features (FiLM, ``"scale_shift"``: :mod:`~lightning_modules.components.film`). Video mode concatenates a clean
    reference latent frame of the same video (a random frame of the clip in training, the first in evaluation) on
    channels to every noisy frame. Guidance is trained: EF → the null token (and null time id) with probability
    ``ef_dropout``, the reference → zeros with probability ``reference_dropout``, independently.

    ``mode="image"`` is the anatomy model: a ``sampling: frames`` batch's frames are single-frame clips (``T = 1``, no
    reference), EF-conditioned or, with ``ef_conditioning=False``, unconditional.

    EMA (diffusers :class:`EMAModel`, :class:`~lightning_modules.ema.DenoiserEMA`) of the UNet and EF conditioner,
    updated once per optimizer step, swapped in for validation, test and :meth:`sample`, checkpointed as ``"ema"``.
    Validation/test noise and (uniform) timesteps come per video from ``eval_seed`` and ``index``, equal under DDP.

    Training randomness is a function of (``seed_everything``'s seed, epoch, ``index``): each item's noise, timestep,
    reference-frame position and dropout coins come from its own generator (:mod:`~lightning_modules.diffusion_draws`),
    whatever rank or batch holds it. So W DDP processes with batch b take the steps of one process with batch W·b, and
    a resumed run those of an uninterrupted one; no two items of an epoch share draws.

    Args:
        block_out_channels, layers_per_block, attention_head_dim, cross_attention_dim, addition_time_embed_dim: the
            UNet (SVD layout: cross-attention in every block but the deepest; heads = channels / head dim; every
            channel count a multiple of 32). The EF token has ``cross_attention_dim`` channels.
        objective: ``"diffusion"`` (default) or ``"flow_matching"`` (then the beta settings and ``prediction_type``
            do not apply, and ``rescale_betas_zero_snr`` and ``snr_gamma`` are refused).
        beta_schedule, beta_start, beta_end, num_train_timesteps, prediction_type, rescale_betas_zero_snr: the
            training DDPMScheduler (sampled with the same schedule).
        sampler, sampling_steps, guidance_scale: :meth:`sample`'s defaults (sampler None: DDIM; flow: Euler).
        ema_decay: EMA decay (None: no EMA); diffusers' warm-up ``min(decay, (1 + n) / (10 + n))`` applies.
        lr, weight_decay, lr_scheduler, warmup_steps, lr_decay_fraction: AdamW and a diffusers ``get_scheduler``
            schedule, per step; a constant one's last ``lr_decay_fraction`` of the steps decays linearly to 0 (WSD).
        ef_loss_weight_cap, ef_loss_weight_bin: None (default), or a cap ≥ 1: each training video's loss weighted by
            the inverse frequency of its EF's bin, capped, mean 1 (:mod:`~lightning_modules.ef_weighting`; the table
            is counted at the first fit start and kept in the checkpoint, so a resumed run weighs alike).
        snr_gamma: None (default), or γ > 0: Min-SNR-γ loss weights (diffusers' ``--snr_gamma``).
        timestep_bias, timestep_bias_multiplier, timestep_bias_portion: "none" (default), or "later" / "earlier": the
            noisiest / cleanest ``portion`` of the schedule drawn ``multiplier`` times as often (SDXL's strategy).
    """

    def __init__(
        self,
        mode: Literal["video", "image"] = "video",
        latent_channels: int = 4,
        block_out_channels: Sequence[int] = (128, 256, 256, 512),
        layers_per_block: int = 2,
        attention_head_dim: int = 64,
        cross_attention_dim: int = 256,
        addition_time_embed_dim: int = 32,
        ef_conditioning: bool = True,
        ef_embedding: Literal["token", "time", "both"] = "token",
        ef_encoding: Literal["timestep", "smooth"] = "timestep",
        time_embedding_norm: Literal["default", "scale_shift"] = "default",
        reference_conditioning: bool = True,
        ef_dropout: float = 0.1,
        reference_dropout: float = 0.0,
        objective: Literal["diffusion", "flow_matching"] = "diffusion",
        num_train_timesteps: int = 1000,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        prediction_type: Literal["v_prediction", "epsilon", "sample"] = "v_prediction",
        rescale_betas_zero_snr: bool = False,
        sampler: str | None = None,
        sampling_steps: int = 50,
        guidance_scale: float = 1.0,
        ema_decay: float | None = 0.9999,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        lr_scheduler: str = "constant_with_warmup",
        warmup_steps: int = 500,
        lr_decay_fraction: float = 0.0,
        eval_seed: int = 0,
        ef_loss_weight_cap: float | None = None,
        ef_loss_weight_bin: float = 5.0,
        snr_gamma: float | None = None,
        timestep_bias: Literal["none", "later", "earlier"] = "none",
        timestep_bias_multiplier: float = 2.0,
        timestep_bias_portion: float = 0.25,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if mode not in ("video", "image"):
            raise ValueError(f"mode must be 'video' or 'image', got {mode!r}")
        if mode == "image" and reference_conditioning:
            raise ValueError("mode='image' is the anatomy model (no reference): set reference_conditioning: false")
        for name, value, allowed in (("ef_embedding", ef_embedding, ("token", "time", "both")),
                                     ("time_embedding_norm", time_embedding_norm, ("default", "scale_shift"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        self.default_sampler = default_sampler(objective, sampler, snr_gamma, rescale_betas_zero_snr)
        check_snr_gamma(snr_gamma)
        check_decay_fraction(lr_decay_fraction, lr_scheduler)
        for name, p in (("ef_dropout", ef_dropout), ("reference_dropout", reference_dropout)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if any(c % 32 for c in block_out_channels):
            raise ValueError(f"block_out_channels must be multiples of 32 (GroupNorm), got {list(block_out_channels)}")
        levels = len(block_out_channels)
        self.unet = UNetSpatioTemporalConditionModel(
            in_channels=latent_channels * (2 if reference_conditioning else 1),
            out_channels=latent_channels,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (levels - 1) + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * (levels - 1),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            num_attention_heads=tuple(max(1, c // attention_head_dim) for c in block_out_channels),
            cross_attention_dim=cross_attention_dim,
            addition_time_embed_dim=addition_time_embed_dim,
            # added time ids: fps, and EF where it is embedded with the timestep
            projection_class_embeddings_input_dim=addition_time_embed_dim * (1 if ef_embedding == "token" else 2),
        )
        if time_embedding_norm == "scale_shift":
            scale_shift_resnets(self.unet)
        self.conditioner = EFConditioner(cross_attention_dim, encoding=ef_encoding)
        self.noise_scheduler = training_scheduler(
            objective, num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
            beta_end=beta_end, prediction_type=prediction_type, rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.timestep_map = biased_timestep_map(num_train_timesteps, timestep_bias, timestep_bias_multiplier,
                                                timestep_bias_portion)  # None: training timesteps stay uniform
        self.ema = EMAModel(self.denoiser_parameters(), decay=ema_decay) if ema_decay is not None else None
        # What sampling needs to know about the training data, recorded at every training step.
        self.register_buffer("train_num_frames", torch.tensor(0))
        self.register_buffer("train_fps", torch.tensor(0.0))
        self.register_buffer("latent_shape", torch.zeros(3, dtype=torch.long))
        if ef_loss_weight_cap is not None:  # zeros until counted (on_fit_start) or loaded
            self.register_buffer("ef_weight_table", empty_table(ef_loss_weight_bin, ef_loss_weight_cap))
        self.val_losses, self.test_losses = IndexedCat(("loss",)), IndexedCat(("loss",))
        # The VAE and scale of the latents it learns (joint sampling checks that two models share them).
        self.latent_space: dict | None = None

    # ------------------------------------------------------------------------------------------------ network
    def condition(self, ef: torch.Tensor | None, drop: torch.Tensor | None = None, batch_size: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """EF ``(B,)`` percent (None: unconditional; then ``batch_size``) → what :meth:`denoise` reads: cross-attention
        tokens ``(B, 1, D)`` and, unless ``ef_embedding="token"``, EF time ids ``(B,)`` — null where ``drop``."""
        mode, count = self.hparams.ef_embedding, batch_size if ef is None else len(ef)
        tokens = self.conditioner(None if mode == "time" else ef, drop, batch_size=count)
        ef_ids = None if mode == "token" else EFConditioner.time_ids(ef, drop, count).to(tokens.device)
        return tokens, ef_ids

    def denoise(self, noisy: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor,
                reference: torch.Tensor | None, fps: torch.Tensor, ef_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """The UNet's prediction for ``noisy`` ``(B, T, C, h, w)`` at ``timestep`` (scalar or ``(B,)``) given EF
        ``tokens`` ``(B, 1, D)`` and ``ef_ids`` ``(B,)`` (:meth:`condition`), a reference latent ``(B, C, h, w)``
        (zeros = none; ignored in image mode) and fps ``(B,)``."""
        if self.hparams.reference_conditioning:
            if reference is None:
                reference = noisy.new_zeros(noisy.shape[0], *noisy.shape[2:])
            noisy = torch.cat([noisy, reference.unsqueeze(1).expand_as(noisy)], dim=2)
        time_ids = fps.view(-1, 1)
        if self.hparams.ef_embedding != "token":
            if ef_ids is None:
                raise ValueError(f"ef_embedding={self.hparams.ef_embedding!r}: denoise needs EF time ids (condition())")
            time_ids = torch.cat([time_ids, ef_ids.view(-1, 1).to(time_ids)], dim=1)
        return self.unet(noisy, timestep, encoder_hidden_states=tokens, added_time_ids=time_ids.to(noisy.dtype),
                         return_dict=False)[0]

    # ---------------------------------------------------------------------------------------------- training
    def _unpack(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        latents, ef, fps, index = batch["video"], batch["ef"].float(), batch["fps"].float(), batch["index"]
        if latents.ndim != 5 or latents.shape[2] != self.hparams.latent_channels:
            raise ValueError(f"VideoDiffusionModule expects latent clips (B, T, C={self.hparams.latent_channels}, h, w), "
                             f"got {tuple(latents.shape)}: set data.space: latent (and a latent_dir)")
        if self.hparams.mode == "image":  # each frame is one sample: (B·T, 1, C, h, w)
            frames = latents.shape[1]
            index = index.repeat_interleave(frames) * frames + torch.arange(frames, device=index.device).repeat(len(ef))
            ef, fps = ef.repeat_interleave(frames), fps.repeat_interleave(frames)
            latents = latents.flatten(0, 1).unsqueeze(1)
        return latents, ef, fps, index

    def _eval_noise(self, index: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        draws = eval_noise(index, shape, self.hparams.eval_seed, self.hparams.num_train_timesteps)
        return tuple(draw.to(self.device) for draw in draws)

    def _train_draws(self, index: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, ...]:
        draws = train_draws(index, shape, shape[0], self.current_epoch, self.hparams.num_train_timesteps,
                            self.timestep_map)
        return tuple(draw.to(self.device) for draw in draws)

    def _shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        latents, ef, fps, index = self._unpack(batch)
        batch_size, frames = latents.shape[:2]
        hp = self.hparams
        if stage == "train":
            noise, timesteps, reference_frame, ef_coin, reference_coin = self._train_draws(index, latents.shape[1:])
            drop_ef, drop_reference = ef_coin < hp.ef_dropout, reference_coin < hp.reference_dropout
            self.train_num_frames.fill_(frames)
            self.train_fps.fill_(fps.mean())
            self.latent_shape.copy_(torch.tensor(latents.shape[2:]))
        else:
            noise, timesteps = self._eval_noise(index, latents.shape[1:])
            drop_ef = drop_reference = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
            reference_frame = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        noise = noise.to(latents.dtype)
        if not hp.ef_conditioning:
            drop_ef = torch.ones_like(drop_ef)
        reference = latents[torch.arange(batch_size, device=self.device), reference_frame]
        reference = torch.where(drop_reference.view(-1, 1, 1, 1), torch.zeros_like(reference), reference)
        noisy, target, model_timesteps = training_pair(self.noise_scheduler, latents, noise, timesteps)
        tokens, ef_ids = self.condition(ef, drop_ef)
        prediction = self.denoise(noisy, model_timesteps, tokens, reference, fps, ef_ids=ef_ids)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        if stage != "train":
            getattr(self, f"{stage}_losses").update(index, loss=per_sample)
            return per_sample.mean()
        self.log("train/loss", per_sample.mean(), prog_bar=True, batch_size=batch_size)
        if hp.snr_gamma is not None:
            per_sample = min_snr_weights(self.noise_scheduler, timesteps, hp.snr_gamma) * per_sample
        if hp.ef_loss_weight_cap is None:
            return per_sample.mean()
        return (ef_weights(self.ef_weight_table, ef, hp.ef_loss_weight_bin) * per_sample).mean()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def _log_eval_loss(self, stage: str) -> None:
        losses = getattr(self, f"{stage}_losses")
        if losses.update_count:  # DistributedSampler gives every rank as many batches: equal on every rank
            # compute() gathers across ranks and drops the sampler's padding: every video once.
            self.log(f"{stage}/loss", losses.compute()["loss"].mean(), prog_bar=True, sync_dist=True)
        losses.reset()

    def configure_optimizers(self):
        hp = self.hparams
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=hp.lr, weight_decay=hp.weight_decay)
        schedule = step_schedule(hp.lr_scheduler, optimizer, hp.warmup_steps,
                                 int(self.trainer.estimated_stepping_batches), hp.lr_decay_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self.latent_space = latent_space_of(datamodule) or self.latent_space
        hp = self.hparams
        if hp.ef_loss_weight_cap is not None and not bool(self.ef_weight_table.any()):  # resumed: kept as saved
            self.ef_weight_table.copy_(training_split_table(datamodule, hp.ef_loss_weight_bin, hp.ef_loss_weight_cap))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["latent_space"] = self.latent_space

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.latent_space = checkpoint.get("latent_space")  # None in checkpoints written before it was recorded

    # ---------------------------------------------------------------------------------------------------- EMA
    def denoiser_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The averaged parameters (state-dict names): the UNet's, then the EF conditioner's."""
        return [*((f"unet.{n}", p) for n, p in self.unet.named_parameters()),
                *((f"conditioner.{n}", p) for n, p in self.conditioner.named_parameters())]

    # The module's epoch hooks run after the callbacks' epoch-start hooks and after their epoch-end hooks: callbacks
    # that sample at epoch end see EMA weights, and checkpoints (saved at validation end or train epoch end) never do.
    def on_validation_epoch_start(self) -> None:
        self.swap_in_ema()

    def on_validation_epoch_end(self) -> None:
        self._log_eval_loss("val")
        self.swap_out_ema()

    def on_test_epoch_start(self) -> None:
        self.swap_in_ema()

    def on_test_epoch_end(self) -> None:
        self._log_eval_loss("test")
        self.swap_out_ema()

    # ---------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        ef: torch.Tensor | Sequence[float] | float | None = None,
        reference: torch.Tensor | None = None,
        num_frames: int | None = None,
        steps: int | None = None,
        scheduler: str | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        *,
        batch_size: int | None = None,
        fps: float | None = None,
        window: int | None = None,
        overlap: int | None = None,
        guide_reference: bool = False,
        image_model: VideoDiffusionModule | None = None,
        joint: JointSchedule | dict | str | None = None,
    ) -> torch.Tensor:
        """Generate latents ``(B, T, C, h, w)``, scaled like the training data (decode with the VAE).

        ``ef``: percent, ``(B,)`` or one value for all (None: unconditional, the null token). ``reference``: latent
        frames ``(B, C, h, w)`` for a video model (e.g. from the anatomy model; None: the trained "no reference" zeros).
        ``num_frames`` (default: the training clip length; image mode: 1) longer than ``window`` (default: the training
        clip length) is generated in windows ``window − overlap`` apart (default overlap: half a window) whose
        predictions are blended at every step (:func:`~lightning_modules.diffusion_sampling.blend_windows`).
        ``guidance_scale`` g: ``u + g (c − u)`` with u the null-EF prediction (also without reference when
        ``guide_reference``); 1 = no guidance. ``generator``: one for the batch, or a list with one per sample (each
        video's noise then depends on its own generator only, whatever else is in the batch). Runs in eval mode with
        EMA weights; the previous state is restored.

        Joint image-and-video sampling (JVID): with ``image_model`` (an image-mode model in the same latent space and
        noise schedule, checked) and ``joint`` (a :class:`~lightning_modules.joint_sampling.JointSchedule` or its
        mapping / ``"every=2"`` text), the steps the schedule selects are taken by the image model denoising every
        frame on its own — frames folded into the batch, ``window`` frames of each video at a time, at the same EF,
        without the reference, under its own guidance (``joint.guidance_scale``, default its ``guidance_scale``).
        """
        hp = self.hparams
        steps, guidance = steps or hp.sampling_steps, hp.guidance_scale if guidance_scale is None else guidance_scale
        ef, reference, count, num_frames = sample_inputs(self, ef, reference, num_frames, batch_size)
        schedule = JointSchedule.parse(joint)
        if schedule not in (None, JointSchedule()) and image_model is None:
            raise ValueError("a joint schedule needs image_model (the image-mode model that takes its steps)")
        if image_model is not None:
            check_joint_models(self, image_model)
            schedule = schedule or JointSchedule()
        window = window or int(self.train_num_frames)
        overlap = window // 2 if overlap is None else overlap
        shape = (count, num_frames, *self.latent_shape.tolist())
        with self.sampling_weights(), (image_model.sampling_weights() if image_model is not None else nullcontext()):
            # Built inside: the EF tokens come from the EMA of the conditioner, as the UNet's weights do.
            predict = guided_prediction(self, ef, reference, count, float(fps or self.train_fps), guidance,
                                        guide_reference)
            image_output = image_steps = None
            if schedule is not None:
                image_steps = schedule.image_steps(steps)
                image_output = frame_prediction(image_model, ef, schedule.guidance_scale, window)
            return denoising_loop(make_sampler(scheduler or self.default_sampler, self.noise_scheduler.config),
                                  lambda x, t: blend_windows(predict(t), x, window, overlap), shape, steps,
                                  generator=generator, device=self.device, dtype=self.dtype,
                                  image_output=image_output, image_steps=image_steps)

    # ---------------------------------------------------------------------------------------------- predict
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """One sample per generation request (:mod:`datamodules.requests`): latents ``(N, T, C, h, w)`` for the
        valid, not yet done requests (``batch["valid"]``, ``batch["todo"]``), each at its ``ef`` with noise from its
        ``seed``, on its ``reference`` frame if any; None if none is left. Sampling options: ``self.predict_options``,
        set by the writer (with ``--ckpt_path`` the checkpoint's hyperparameters override command-line model ones)."""
        todo = batch["valid"] & batch.get("todo", torch.ones_like(batch["valid"]))
        if not bool(todo.any()):
            return None
        generators = [torch.Generator().manual_seed(int(seed)) for seed in batch["seed"][todo].tolist()]
        reference = batch.get("reference")
        return self.sample(ef=batch["ef"][todo], reference=None if reference is None else reference[todo],
                           generator=generators, **getattr(self, "predict_options", {}))


def load_diffusion(checkpoint, mode: str | None = None, map_location="cpu") -> VideoDiffusionModule:
    """A trained :class:`VideoDiffusionModule` (read with ``weights_only=True``), frozen: eval, no gradients.
    ``mode``: ``"image"`` for an anatomy model, ``"video"``; a checkpoint of the other mode is refused, naming it."""
    module = load_module(VideoDiffusionModule, checkpoint, map_location=map_location)
    if mode is not None and module.hparams.mode != mode:
        kinds = {"image": "an image-mode (anatomy) model", "video": "a video model"}
        raise ValueError(f"{checkpoint} is {kinds[module.hparams.mode]}; {kinds[mode]} is needed here")
    return module.eval().requires_grad_(False)
