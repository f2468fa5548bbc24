"""Joint image-and-video sampling (JVID, Reynaud et al. 2024): at each denoising step either the video model denoises
the whole clip or an image model in the same latent space denoises every frame on its own. :class:`JointSchedule`
says which steps go to the image model; :func:`check_joint_models` refuses a pair that does not share latent shape,
latent scaling and noise schedule; :func:`latent_space_of` records the latent space a model trains in.

Which samplers allow switching models between steps, and why: DDIM, DDPM and Euler are one-step methods — the update
from step i to i + 1 reads only the current sample and the current prediction — so a step may come from either model
with nothing else changed. DPM-Solver++ (2M) is a multistep method: its second-order update combines the current
data prediction with the previous step's. Across a switch that previous prediction came from the other model, so at
every step where the model changes the loop takes a first-order step instead (DPM-Solver++(1)), and the
next step of the same model is second order again (:func:`~lightning_modules.diffusion_sampling.denoising_loop`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields

import torch

from lightning_modules.diffusion_sampling import guided_prediction

# The noise-schedule settings two models must share for one sampler to serve both.
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                  "rescale_betas_zero_snr", "prediction_type", "shift")  # shift: flow matching's


@dataclass(frozen=True)
class JointSchedule:
    """The denoising steps (0 = the first, at pure noise) that the image model takes; a step is an image step when any
    rule selects it.

    Args:
        every: every k-th step — steps k − 1, 2k − 1, … (1: all of them; 2: alternate, the video model first).
        start: this fraction of the steps at the start (rounded to the nearest step).
        end: this fraction of the steps at the end.
        probability: each step independently with this probability, drawn from ``seed`` (the same steps for every
            batch and every run with that seed).
        seed: the seed of ``probability``'s draws.
        guidance_scale: the image model's classifier-free guidance (None: its own ``guidance_scale``).
    """

    every: int | None = None
    start: float = 0.0
    end: float = 0.0
    probability: float = 0.0
    seed: int = 0
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if self.every is not None and (isinstance(self.every, bool) or int(self.every) != self.every
                                       or self.every < 1):
            raise ValueError(f"joint.every must be an integer ≥ 1, got {self.every!r}")
        for name in ("start", "end", "probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"joint.{name} must be a fraction in [0, 1], got {value!r}")

    @classmethod
    def parse(cls, value: JointSchedule | Mapping | str | None) -> JointSchedule | None:
        """A schedule from itself, a mapping (``{every: 2}``, a config's ``joint:``) or text (``"every=2"``,
        ``"start=0.3,end=0.1"``, ``"probability=0.5,seed=1"``, the command line's); None stays None."""
        if value is None or isinstance(value, JointSchedule):
            return value
        known = {field.name: field.type for field in fields(cls)}
        if isinstance(value, str):
            items = {}
            for part in filter(None, (piece.strip() for piece in value.split(","))):
                key, sep, text = part.partition("=")
                if not sep:
                    raise ValueError(f"joint schedule {value!r}: expected key=value pairs ({', '.join(known)}), "
                                     f"got {part!r}")
                key = key.strip()
                if key not in known:
                    raise ValueError(f"joint schedule {value!r}: unknown key {key!r}; expected {', '.join(known)}")
                number = float(text)
                items[key] = int(number) if key in ("every", "seed") and number == int(number) else number
            value = items
        if not isinstance(value, Mapping):
            raise ValueError(f"joint schedule: expected a mapping or 'key=value,…' text, got {value!r}")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"joint schedule: unknown key(s) {', '.join(unknown)}; expected {', '.join(known)}")
        return cls(**value)

    def image_steps(self, steps: int) -> list[bool]:
        """For each of ``steps`` denoising steps, in sampling order: True where the image model denoises."""
        chosen = [False] * steps
        if self.every is not None:
            for i in range(self.every - 1, steps, self.every):
                chosen[i] = True
        head, tail = _round_half_up(self.start * steps), _round_half_up(self.end * steps)
        for i in range(min(head, steps)):
            chosen[i] = True
        for i in range(max(steps - tail, 0), steps):
            chosen[i] = True
        if self.probability > 0:
            coins = torch.rand(steps, generator=torch.Generator().manual_seed(int(self.seed)))
            chosen = [c or bool(coin < self.probability) for c, coin in zip(chosen, coins)]
        return chosen

    def describe(self) -> str:
        """``every=2,start=0.3``: the settings that differ from the defaults (``none`` when none do)."""
        defaults = JointSchedule()
        text = ",".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                        for key, value in asdict(self).items() if value != getattr(defaults, key))
        return text or "none"


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def latent_space_of(datamodule) -> dict | None:
    """The latent space a DataModule serves: ``{"vae_checksum": …, "scaling_factor": …}`` (the scale the latents are
    multiplied by, 1.0 when unscaled) read from its training split's latent cache; None when it serves pixels or the
    cache says nothing."""
    hparams = getattr(datamodule, "hparams", {}) or {}
    dataset = (getattr(datamodule, "datasets", None) or {}).get("train")
    if hparams.get("space") != "latent" or dataset is None or not getattr(dataset, "records", None):
        return None
    from datamodules.latents import entry_path, read_meta

    meta = read_meta(entry_path(hparams["latent_dir"], dataset.records[0]))
    scale = float(dataset.scaling_factor) if getattr(dataset, "scaled", True) else 1.0
    return {"vae_checksum": meta.vae_checksum, "scaling_factor": scale}


def check_joint_models(video_model, image_model) -> None:
    """Refuse, naming what differs, an image model that cannot share a denoising loop with ``video_model``: it must be
    an image-mode model, make latents of the same shape, from the same VAE at the same scale, and be trained under
    the same noise schedule and prediction type. Warns when a checkpoint predates the record of its latent space."""
    if video_model.hparams.mode != "video":
        raise ValueError("joint sampling: the model that samples must be a video model; the image model is passed "
                         "as image_model")
    if image_model.hparams.mode != "image":
        raise ValueError("joint sampling: image_model must be an image-mode (anatomy) VideoDiffusionModule, got a "
                         "video model")
    if int(image_model.train_num_frames) == 0:
        raise RuntimeError("joint sampling: image_model is not trained (train_num_frames and latent_shape are set "
                           "by training)")
    video_shape, image_shape = video_model.latent_shape.tolist(), image_model.latent_shape.tolist()
    if video_shape != image_shape:
        raise ValueError(f"joint sampling: the video model makes latents {tuple(video_shape)}, the image model "
                         f"{tuple(image_shape)}: both must be trained on the same latent space")
    video_config, image_config = video_model.noise_scheduler.config, image_model.noise_scheduler.config
    differ = [f"{key} {video_config.get(key)!r} vs {image_config.get(key)!r}" for key in _SCHEDULE_KEYS
              if video_config.get(key) != image_config.get(key)]
    if differ:
        raise ValueError("joint sampling: the two models were trained under different noise schedules (video vs "
                         f"image: {'; '.join(differ)}); one sampler cannot serve both")
    video_space, image_space = video_model.latent_space, image_model.latent_space
    if video_space is None or image_space is None:
        warnings.warn("joint sampling: cannot check that both models read the same VAE's latents at the same scale "
                      "(a checkpoint written before its latent space was recorded)", stacklevel=3)
        return
    if video_space["vae_checksum"] != image_space["vae_checksum"]:
        raise ValueError(f"joint sampling: the video model was trained on latents of VAE "
                         f"{video_space['vae_checksum'][:12]}…, the image model on VAE "
                         f"{image_space['vae_checksum'][:12]}…: their latents are not the same space")
    if not math.isclose(video_space["scaling_factor"], image_space["scaling_factor"], rel_tol=1e-6):
        raise ValueError(f"joint sampling: the video model's latents are scaled by {video_space['scaling_factor']:g}, "
                         f"the image model's by {image_space['scaling_factor']:g}")


def frame_prediction(image_model, ef: torch.Tensor | None, guidance_scale: float | None,
                     window: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``output(latents, t)``: an image-mode model's prediction for every frame of videos ``(B, T, C, h, w)`` on its
    own — frames folded into the batch, ``window`` frames of each video at a time (the video model's memory), each
    video's frames at its EF ``ef (B,)`` (None: the null token), under guidance ``guidance_scale`` (None: the model's
    own), at the frame rate the model trained on."""
    guidance = image_model.hparams.guidance_scale if guidance_scale is None else guidance_scale
    ef = None if ef is None else ef.to(image_model.device)

    def output(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        count, frames = latents.shape[:2]
        chunks = []
        for start in range(0, frames, window):
            chunk = latents[:, start:start + window].to(image_model.device, image_model.dtype)
            length = chunk.shape[1]
            frame_ef = None if ef is None else ef.repeat_interleave(length)
            predict = guided_prediction(image_model, frame_ef, None, count * length, float(image_model.train_fps),
                                        guidance)
            folded = predict(timestep)(chunk.flatten(0, 1).unsqueeze(1))
            chunks.append(folded.squeeze(1).unflatten(0, (count, length)))
        return torch.cat(chunks, dim=1).to(latents.device, latents.dtype)
    return output
