"""Stand-ins for the field's TorchScript extractors: small fixed random networks with the forward signatures of
StyleGAN2-ADA's ``inception-2015-12-05.pt`` and StyleGAN-V's ``i3d_torchscript.pt``, saved with ``torch.jit.save``
so that the code under test loads them exactly as it loads the real files. Their features depend on the pixels
(spatially, and for the I3D temporally), so a Fréchet distance of them separates sets of videos. ``oracle``
computes FID, IS and FVD from the plain modules' features with numpy and scipy: the ground truth the code under test
is compared with."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.metrics.generative import rgb


class StandInInception(nn.Module):
    def __init__(self, features: int = 6, classes: int = 5) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("project", torch.randn(features, 3 * 4 * 4, generator=generator))
        self.register_buffer("classify", torch.randn(classes, features, generator=generator) * 3)
        self.register_buffer("bias", torch.randn(classes, generator=generator))

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(img.float() / 255.0, 4).flatten(1)
        features = torch.tanh(pooled @ self.project.t() - 2.0)
        if return_features:
            return features
        logits = features @ self.classify.t()
        if not no_output_bias:
            logits = logits + self.bias
        return logits.softmax(dim=1)


class StandInI3D(nn.Module):
    """Like the Kinetics I3D, it fails inside TorchScript on clips shorter than ``min_frames``."""

    def __init__(self, features: int = 5, min_frames: int = 1) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("project", torch.randn(features, 3 * 4 * 2 * 2, generator=generator))
        self.min_frames = min_frames

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if x.shape[2] < self.min_frames:
            raise RuntimeError("temporal pooling: output size is too small")
        if rescale:
            x = x / 255.0 * 2.0 - 1.0
        features = F.adaptive_avg_pool3d(x, (4, 2, 2)).flatten(1) @ self.project.t()
        return features if return_features else features.softmax(dim=1)


def save_stand_ins(folder: Path, i3d_min_frames: int = 1) -> tuple[Path, Path]:
    """``(inception.pt, i3d.pt)`` TorchScript files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "inception.pt", folder / "i3d.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is the format the field ships
        warnings.filterwarnings("ignore", message=".*torch.jit.(script|save). is deprecated",
                                category=DeprecationWarning)
        for module, path in zip((StandInInception(), StandInI3D(min_frames=i3d_min_frames)), paths):
            torch.jit.save(torch.jit.script(module), str(path))
    return paths


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two feature sets' Gaussian fits (unbiased covariances), with scipy's sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def inception_score(p: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """StyleGAN-V's is50k on class probabilities, in sample order."""
    scores = []
    for i in range(splits):
        part = p[i * len(p) // splits:(i + 1) * len(p) // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def oracle(real: torch.Tensor, fake: torch.Tensor, lengths: tuple[int, ...]) -> dict[str, float]:
    """The metrics from the plain (unscripted) stand-ins' features, computed with numpy and scipy."""
    inception, i3d = StandInInception(), StandInI3D()
    with torch.no_grad():
        def frames(v):
            return rgb(v).flatten(0, 1)

        def clips(v, length):
            return rgb(v)[:, :length].permute(0, 2, 1, 3, 4).float()

        values = {"fid": frechet(inception(frames(real), return_features=True).double().numpy(),
                                 inception(frames(fake), return_features=True).double().numpy())}
        if frames(fake).shape[0] >= 10:  # one frame per split at least, or IS is left out
            values["is"], values["is_std"] = inception_score(inception(frames(fake), no_output_bias=True).double()
                                                             .numpy())
        for length in lengths:
            values[f"fvd{length}"] = frechet(
                i3d(clips(real, length), rescale=True, resize=True, return_features=True).double().numpy(),
                i3d(clips(fake, length), rescale=True, resize=True, return_features=True).double().numpy())
    return values
