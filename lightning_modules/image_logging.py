"""Log an image through whatever logger a Trainer has: TensorBoard, wandb, or PNG files next to the other logs.

Modules and callbacks call :func:`log_image` and need not know how a run is logged; :func:`to_uint8` and
:func:`image_grid` turn model-range tensors into the uint8 pictures it takes.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Model-range pixels in [-1, 1] (any shape, any float dtype) → uint8 in [0, 255], rounded and clamped."""
    return ((pixels.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)


def image_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of frames ``(N, C, H, W)`` in [-1, 1] (C = 1 or 3, same N per row) → one uint8 picture.

    The result is ``(rows × H, N × W)`` for grayscale or ``(rows × H, N × W, 3)`` for RGB, frames side by side.
    """
    stacked = torch.stack([row.detach() for row in rows])  # (R, N, C, H, W)
    grid = to_uint8(stacked).cpu().permute(0, 3, 1, 4, 2)  # (R, H, N, W, C)
    num_rows, height, num_frames, width, channels = grid.shape
    grid = grid.reshape(num_rows * height, num_frames * width, channels).numpy()
    return grid[..., 0] if channels == 1 else grid


def _file_name(key: str, step: int) -> str:
    # Keys are metric-style names ("val/reconstructions"); keep them readable but safe as one path component.
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', key).strip('_') or 'image'}_step{step:08d}.png"


def log_folder(logger: Logger | None, trainer: L.Trainer) -> Path:
    """Where files logged beside ``logger`` go: ``<its log_dir or save_dir, else default_root_dir>/images``."""
    folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
    return Path(folder) / "images"


@rank_zero_only
def log_image(trainer: L.Trainer, key: str, image: np.ndarray, step: int) -> list[Path]:
    """Log a uint8 ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB) image under ``key`` at ``step`` on global rank 0.

    Each of ``trainer.loggers`` gets it its own way: TensorBoard ``add_image``, wandb a ``wandb.Image``; any other
    logger (CSV, MLflow, …) — or none at all — a PNG ``<log_dir>/images/<key>_step<step>.png`` (the logger's
    ``log_dir``, else ``trainer.default_root_dir``). Returns the PNG files written (other ranks: None).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f"image for {key!r} must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    written: list[Path] = []
    loggers: list[Logger | None] = list(trainer.loggers) or [None]
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HW" if image.ndim == 2 else "HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        else:
            path = log_folder(logger, trainer) / _file_name(key, step)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            written.append(path)
    return written
