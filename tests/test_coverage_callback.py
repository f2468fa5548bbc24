"""CoverageCallback measures the chain that ships: the values it logs equal an independent computation from the
samples it must draw (brute-force search over every frame pair, numpy's quantile for τ, the prdc package, scipy's
sqrtm) — for anatomy-model frames, for videos animated from them, and, for videos animated from real frames, identity
preservation instead of coverage; planted generators that copy k % of the training set read coverage k % and
memorisation 1; every validation of a fit is measured; 2 DDP processes log the values of 1; clear errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks.coverage import CoverageCallback
from callbacks.coverage_measures import IDENTITY_METRIC_NAMES, METRIC_NAMES, CoverageMeasures
from datamodules import EchoNetDataModule, GenerationRequests, generate_phantom
from lightning_modules.calibration import Calibration
from lightning_modules.diffusion import VideoDiffusionModule
from lightning_modules.ef_regressor import EFRegressorModule
from lightning_modules.protocols import ProtocolMismatchError
from lightning_modules.reid import ReIDModule
from tests.helpers.cli import REPO
from tests.helpers.data import encode_tiny_latents
from tests.helpers.models import TINY_DIFFUSION, TINY_EF, conformal_quantile, distance_reid, save_cli_checkpoint

FRAMES, LATENT, STEPS = 4, 8, 2


def untrained(**kwargs) -> VideoDiffusionModule:
    module = VideoDiffusionModule(**TINY_DIFFUSION, ema_decay=None, **kwargs)
    module.train_num_frames.fill_(1 if kwargs.get("mode") == "image" else FRAMES)
    module.train_fps.fill_(12.5)
    module.latent_shape.copy_(torch.tensor([4, LATENT, LATENT]))
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """A 12-patient phantom encoded by a tiny VAE (latents 4 × 8 × 8; 6 train, 5 val videos), a distance re-ID, an
    EF regressor on latents, and untrained tiny video and anatomy models, all as checkpoints."""
    out = tmp_path_factory.mktemp("coverage")
    root = generate_phantom(out / "data", patients=12, videos_per_patient=1, seed=5, size=32, frames=(20, 24),
                            split_fractions=(0.5, 0.4, 0.1))
    encode_tiny_latents(root, out / "latents", export=out / "vae")
    data = dict(root=root, space="latent", latent_dir=str(out / "latents"), clip_length=FRAMES, batch_size=2)
    reid = distance_reid()
    regressor = EFRegressorModule(in_channels=4, **TINY_EF)
    with torch.no_grad():
        regressor.network.fc.bias.fill_(50.0)
    torch.manual_seed(1)
    diffusion = untrained(reference_dropout=0.1)
    anatomy = untrained(mode="image", reference_conditioning=False)
    return SimpleNamespace(root=root, out=out, data=data, reid=reid, regressor=regressor, diffusion=diffusion,
                           anatomy=anatomy, reid_ckpt=save_cli_checkpoint(reid, out / "reid.ckpt"),
                           ef_ckpt=save_cli_checkpoint(regressor, out / "ef.ckpt"),
                           lvdm_ckpt=save_cli_checkpoint(diffusion, out / "lvdm.ckpt"),
                           lidm_ckpt=save_cli_checkpoint(anatomy, out / "lidm.ckpt"))


# ---------------------------------------------------------------------------------------------- the oracle
def split_videos(world, split: str, **options) -> dict[str, torch.Tensor]:
    """One batch of a whole split, served as evaluation serves it (posterior means unless ``options`` say not)."""
    datamodule = EchoNetDataModule(**{**world.data, "batch_size": 64, "latent_posterior": "mean", **options})
    datamodule.setup("fit")
    return next(iter(datamodule.eval_dataloader(split)))


class Oracle:
    """The head on every frame pair, in float64."""

    def __init__(self, reid: ReIDModule, bank_videos: torch.Tensor) -> None:
        self.reid = reid
        self.weight, self.bias = reid.head.weight.detach().double().reshape(-1), float(reid.head.bias)
        self.bank = self.embed(bank_videos)

    def embed(self, videos: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.reid.embed_videos(videos).double()

    def best(self, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        scores = ((queries[:, :, None, None] - self.bank[None, None]).abs() @ self.weight) + self.bias  # (Q,F,R,F')
        value, column = scores.flatten(2).max(dim=1).values.max(dim=1)
        return value.numpy(), (column // self.bank.shape[1]).numpy()

    def pair(self, first: torch.Tensor, second: torch.Tensor) -> np.ndarray:
        return (((first[:, :, None] - second[:, None]).abs() @ self.weight) + self.bias).flatten(1).max(1).values.numpy()


def coverage_of(matches: np.ndarray, bank: int) -> float:
    return len(set(matches.tolist())) / min(bank, len(matches))


def distribution(oracle: Oracle, fake: torch.Tensor, k: int = 2) -> dict[str, float]:
    from prdc import compute_prdc
    from scipy.linalg import sqrtm

    real, fake = oracle.bank.mean(1).numpy(), fake.mean(1).numpy()
    prdc = compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    cov1, cov2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    fd = float(((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(cov1 + cov2 - 2 * np.real(sqrtm(cov1 @ cov2))))
    return {"density": prdc["density"], "prdc_coverage": prdc["coverage"], "fd_reid": fd}


def temporal(oracle: Oracle, fake: torch.Tensor) -> float:
    logits = (np.abs((fake[:, :1] - fake[:, 1:]).numpy()) @ oracle.weight.numpy()) + oracle.bias
    return float((1 / (1 + np.exp(-logits))).mean())


def ef_faithfulness(read: np.ndarray, requested: np.ndarray) -> dict[str, float]:
    return {"ef_mae": float(np.abs(read - requested).mean()),
            "ef_r2": float(1 - ((read - requested) ** 2).sum() / ((requested - requested.mean()) ** 2).sum())}


def as_written(world, latents: torch.Tensor) -> torch.Tensor:
    """Latents → what a video file of them holds → the VAE's encoding of that (posterior mean × scaling factor)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(world.out / "vae")
    scale = vae.config.scaling_factor
    with torch.no_grad():
        pixels = vae.decode(latents.flatten(0, 1) / scale).sample
        stored = ((pixels.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # 8 bits, read back into [-1, 1]
        return (vae.encode(stored).latent_dist.mean * scale).unflatten(0, latents.shape[:2])


def requested_samples(world, num_samples: int, *, first_frame: bool = False,
                      joint: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Requests 0 … n − 1 (uniform EF, seed 0): their EFs and latents, each animated from its anatomy frame (noise
    seed ^ 0x5EED) with its own noise — or, with ``first_frame``, the anatomy model's frames themselves."""
    requests = GenerationRequests(attempts=num_samples)
    ef = torch.tensor([requests.ef(i) for i in range(num_samples)])
    seeds = [requests.noise_seed(i) for i in range(num_samples)]
    frames = world.anatomy.sample(ef=ef, generator=[torch.Generator().manual_seed(s ^ 0x5EED) for s in seeds])
    if first_frame:
        return ef, frames
    return ef, world.diffusion.sample(ef=ef, reference=frames[:, 0], num_frames=FRAMES, steps=STEPS,
                                      generator=[torch.Generator().manual_seed(s) for s in seeds],
                                      **({} if joint is None else dict(image_model=world.anatomy, joint=joint)))


def generative_oracle(world, num_samples: int, first_frame: bool = False) -> dict[str, float]:
    """FID/IS/FVD (stand-in extractors, numpy/scipy) of the decoded, 8-bit requests 0 … n − 1 and of the first n
    validation videos, each against the training split's pixel clips under the callback's protocol (``first_frame``:
    the anatomy model's frames against first frames, FID and IS only)."""
    from diffusers import AutoencoderKL

    from tests.helpers.extractors import oracle

    vae = AutoencoderKL.from_pretrained(world.out / "vae")
    _, latents = requested_samples(world, num_samples, first_frame=first_frame)
    with torch.no_grad():
        pixels = vae.decode(latents.flatten(0, 1) / vae.config.scaling_factor).sample.unflatten(0, latents.shape[:2])
    synthetic = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixel_data = dict(space="pixel", latent_dir=None, latent_posterior="sample", size=tuple(synthetic.shape[-2:]),
                      **(dict(clip_length=1, eval_start="first") if first_frame else {}))
    train, val = (((split_videos(world, split, **pixel_data)["video"] + 1) * 127.5).round().to(torch.uint8)
                  for split in ("train", "val"))
    lengths = () if first_frame else (FRAMES,)
    values = {**oracle(train, synthetic, lengths),
              **{f"real_{name}": value for name, value in oracle(train, val[:num_samples], lengths).items()}}
    return values


def synthetic_oracle(world, num_samples: int, *, first_frame: bool = False, written: bool = False,
                     joint: str | None = None) -> dict[str, float]:
    """Requests 0 … n − 1 (uniform EF, seed 0), each animated from its anatomy frame (noise seed ^ 0x5EED) with its
    own noise — or, with ``first_frame``, the anatomy model's frames themselves — against the training videos under
    the callback's protocol (4-frame clips; first frames), τ the 0.95-quantile of the validation videos. ``written``:
    the samples are measured through a video file and the VAE, as ``evaluate`` measures a written dataset. ``joint``:
    sampled jointly with the anatomy model as the image model."""
    options = dict(clip_length=1, eval_start="first") if first_frame else {}
    oracle = Oracle(world.reid, split_videos(world, "train", **options)["video"])
    heldout = oracle.embed(split_videos(world, "val", **options)["video"])
    ef, synthetic = requested_samples(world, num_samples, first_frame=first_frame, joint=joint)
    fake = oracle.embed(as_written(world, synthetic) if written else synthetic)
    fake_score, fake_match = oracle.best(fake)
    real_score, real_match = oracle.best(heldout)
    tau = conformal_quantile(real_score, 0.95)
    bank, n = len(oracle.bank), len(fake)
    coverage, reference = coverage_of(fake_match, bank), coverage_of(real_match, bank)
    equal = min(n, len(real_match))
    values = {"coverage": coverage, "reference_coverage": reference, "tau": tau,
              "relative_coverage": coverage_of(fake_match[:equal], bank) / coverage_of(real_match[:equal], bank),
              "memorization_rate": float((fake_score > tau).mean()),
              "memorized_coverage": len(set(fake_match[fake_score > tau].tolist())) / bank,
              **distribution(oracle, fake)}
    values.update({f"coverage@{size}": coverage_of(fake_match[:size], bank) for size in (1, 3, 5, 6) if size <= n})
    kept = fake_match[fake_score <= tau]  # what a privacy-filtered dataset keeps, in request order
    values.update(filtered_coverage=coverage_of(kept, bank),
                  **{f"filtered_coverage@{size}": coverage_of(kept[:size], bank) for size in (1, 3, 5) if size <= len(kept)})
    if not first_frame:
        values["temporal_consistency"] = temporal(oracle, fake)
        values.update(ef_faithfulness(world.regressor.read_ef(synthetic).double().numpy(), ef.double().numpy()))
    return values


def identity_oracle(world, num_samples: int) -> dict[str, float]:
    """Validation videos with index < n animated from their first frame (as served in validation, posterior
    samples), each scored against its own source video."""
    oracle = Oracle(world.reid, split_videos(world, "train")["video"])
    source = oracle.embed(split_videos(world, "val")["video"])
    val = split_videos(world, "val", latent_posterior="sample")
    chosen = val["index"] < num_samples
    real, ef, index = val["video"][chosen], val["ef"][chosen], val["index"][chosen]
    synthetic = world.diffusion.sample(ef=ef, reference=real[:, 0], num_frames=FRAMES, steps=STEPS,
                                       generator=[torch.Generator().manual_seed(int(i)) for i in index])
    fake = oracle.embed(synthetic)
    tau = conformal_quantile(oracle.best(source)[0], 0.95)
    identity = oracle.pair(fake, source[index])
    return {"identity_score": float(identity.mean()), "identity_above_tau": float((identity > tau).mean()),
            "tau": tau, "fd_reid": distribution(oracle, fake)["fd_reid"], "temporal_consistency": temporal(oracle, fake),
            **ef_faithfulness(world.regressor.read_ef(synthetic).double().numpy(), ef.double().numpy())}


def logged(log_dir: Path) -> dict[str, float]:
    (row,) = [row for row in csv.DictReader(open(next(Path(log_dir).rglob("metrics.csv")))) if row.get("val/tau")]
    return {key.removeprefix("val/"): float(value) for key, value in row.items() if key.startswith("val/") and value}


def validate(module, callback: CoverageCallback, root: Path, data: dict) -> dict[str, float]:
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(root, name="run"), callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, EchoNetDataModule(**data))
    return logged(trainer.logger.log_dir)


# ------------------------------------------------------------------------------------------- the three modes
@pytest.mark.parametrize("written", [False, True], ids=["latents", "as_written"])
def test_videos_animated_from_anatomy_frames_log_what_an_independent_computation_gives(world, tmp_path, written):
    callback = CoverageCallback(str(world.reid_ckpt), ef_regressor=str(world.ef_ckpt), anatomy=str(world.lidm_ckpt),
                                vae=str(world.out / "vae") if written else None, num_samples=7, batch_size=3,
                                steps=STEPS, k=2, cache_dir=str(tmp_path / "cache"))
    values = validate(world.diffusion, callback, tmp_path, world.data)
    expected = synthetic_oracle(world, 7, written=written)
    assert set(METRIC_NAMES) <= set(values) and not {"identity_score", "identity_above_tau"} & set(values)
    assert {key for key in values if key.startswith("coverage@")} == {"coverage@1", "coverage@3", "coverage@5",
                                                                    "coverage@6", "coverage@7"}
    assert 0 < values["filtered_coverage"] <= 1
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert callback.protocol.name == "clip:4" and callback.calibration.heldout_videos == 5
    # Both splits were embedded once, into the cache; both figures are in the logs.
    assert len(list((tmp_path / "cache").glob("reid-train-*.safetensors"))) == 1
    images = sorted(path.name.split("_step")[0] for path in (tmp_path / "run").rglob("*.png"))
    assert images == ["val_coverage_curve", "val_coverage_scores"]


def test_a_pixel_regressor_reads_the_decoding_the_re_id_measures_and_each_video_is_decoded_once(world, tmp_path,
                                                                                              monkeypatch):
    """The pipeline's setting, an EF regressor on pixels beside the VAE: the logged EF faithfulness is the regressor's
    reading of the videos as written (decoded, quantised), the coverage that of their re-encoding, and the VAE
    decodes each generated video once for both."""
    import callbacks.coverage as coverage_module
    from lightning_modules.vae_utils import decode_as_written, load_frozen_vae

    torch.manual_seed(2)
    regressor = EFRegressorModule(in_channels=1, **TINY_EF)  # random weights: each video reads its own EF
    with torch.no_grad():
        regressor.network.fc.bias.fill_(50.0)
    decoded = []
    monkeypatch.setattr(coverage_module, "decode_as_written",
                        lambda vae, latents: decoded.append(len(latents)) or decode_as_written(vae, latents))
    callback = CoverageCallback(str(world.reid_ckpt), ef_regressor=str(save_cli_checkpoint(regressor, tmp_path / "ef.ckpt")),
                                anatomy=str(world.lidm_ckpt), vae=str(world.out / "vae"), num_samples=7, batch_size=3,
                                steps=STEPS, k=2, cache_dir=str(tmp_path / "cache"))
    values = validate(world.diffusion, callback, tmp_path, world.data)
    assert decoded == [3, 3, 1]
    ef, synthetic = requested_samples(world, 7)
    with torch.no_grad():
        read = regressor.eval().read_ef(decode_as_written(load_frozen_vae(world.out / "vae"), synthetic))
    expected = {**synthetic_oracle(world, 7, written=True), **ef_faithfulness(read.double().numpy(), ef.double().numpy())}
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert len(set(read.tolist())) == 7


def test_fid_is_fvd_of_the_requests_equal_an_oracle(world, tmp_path):
    """With stand-in TorchScript extractors and the VAE: ``val/fid``, ``val/is``, ``val/fvd4`` of the decoded,
    quantised requests and ``val/real_*`` of the validation videos, both against the training split's pixel clips,
    equal numpy/scipy on the stand-ins' features."""
    from tests.helpers.extractors import save_stand_ins

    inception, i3d = save_stand_ins(tmp_path / "extractors")
    callback = CoverageCallback(str(world.reid_ckpt), anatomy=str(world.lidm_ckpt), vae=str(world.out / "vae"),
                                num_samples=7, batch_size=3, steps=STEPS, k=2, cache_dir=str(tmp_path / "cache"),
                                inception=str(inception), i3d=str(i3d))
    values = validate(world.diffusion, callback, tmp_path, world.data)
    expected = generative_oracle(world, 7)
    assert set(expected) == {"fid", "is", "is_std", "fvd4", "real_fid", "real_is", "real_is_std", "real_fvd4"}
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert values["fid"] > 0 and values["fvd4"] > 0

    with pytest.raises(ValueError, match="FID/IS/FVD are measured on decoded pixels; give the VAE"):
        CoverageCallback(str(world.reid_ckpt), anatomy=str(world.lidm_ckpt), inception=str(inception))
    identity = CoverageCallback(str(world.reid_ckpt), vae=str(world.out / "vae"), inception=str(inception))
    with pytest.raises(ValueError, match="measure what the generator ships, fully synthetic videos: give anatomy"):
        validate(world.diffusion, identity, tmp_path / "identity", world.data)


def test_an_anatomy_fit_logs_the_fid_and_is_of_its_frames_against_first_frames(world, tmp_path):
    from tests.helpers.extractors import save_stand_ins

    inception, i3d = save_stand_ins(tmp_path / "extractors")
    callback = CoverageCallback(str(world.reid_ckpt), vae=str(world.out / "vae"), num_samples=12, batch_size=4, k=2,
                                cache_dir=str(tmp_path / "cache"), inception=str(inception))
    values = validate(world.anatomy, callback, tmp_path, {**world.data, "sampling": "frames", "num_frames": 2})
    expected = generative_oracle(world, 12, first_frame=True)
    # The 5 validation frames are fewer than IS's 10 splits: the ground-truth row has FID only
    assert set(expected) == {"fid", "is", "is_std", "real_fid"} and "real_is" not in values
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    with pytest.raises(ValueError, match="an anatomy fit samples frames: FVD needs videos"):
        validate(world.anatomy, CoverageCallback(str(world.reid_ckpt), vae=str(world.out / "vae"), i3d=str(i3d)),
                 tmp_path / "fvd", {**world.data, "sampling": "frames", "num_frames": 2})


def test_joint_samples_are_measured_as_the_writer_samples_them(world, tmp_path):
    """``joint: {every: 2}``: the videos measured are the joint samples (anatomy model as image model), so every value
    equals the oracle of joint samples — which differs from the video model's alone."""
    callback = CoverageCallback(str(world.reid_ckpt), ef_regressor=str(world.ef_ckpt), anatomy=str(world.lidm_ckpt),
                                num_samples=7, batch_size=3, steps=STEPS, k=2, cache_dir=str(tmp_path / "cache"),
                                joint={"every": 2})
    values = validate(world.diffusion, callback, tmp_path, world.data)
    expected = synthetic_oracle(world, 7, joint="every=2")
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    alone = synthetic_oracle(world, 7)
    assert expected["fd_reid"] != pytest.approx(alone["fd_reid"], rel=1e-2), (expected, alone)


def test_an_anatomy_fit_measures_its_own_frames_against_first_frames(world, tmp_path):
    callback = CoverageCallback(str(world.reid_ckpt), num_samples=7, batch_size=4, k=2,
                                cache_dir=str(tmp_path / "cache"))
    values = validate(world.anatomy, callback, tmp_path, {**world.data, "sampling": "frames", "num_frames": 2})
    expected = synthetic_oracle(world, 7, first_frame=True)
    assert callback.protocol.name == "first_frame"
    assert not {"ef_r2", "temporal_consistency"} & set(values)
    for name, value in expected.items():
        assert values[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_videos_animated_from_real_frames_are_measured_as_identity_preservation_not_coverage(world, tmp_path):
    callback = CoverageCallback(str(world.reid_ckpt), ef_regressor=str(world.ef_ckpt), num_samples=4, steps=STEPS,
                                k=2, cache_dir=str(tmp_path / "cache"))
    values = validate(world.diffusion, callback, tmp_path, world.data)
    assert set(values) - {"loss"} == set(IDENTITY_METRIC_NAMES)  # no coverage, no memorisation
    for name, value in identity_oracle(world, 4).items():
        assert values[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


# ------------------------------------------------------------------------------------ planted generators
class PlantedAnatomy(L.LightningModule):
    """An "anatomy model" that returns one of ``frames`` (the first frames of a share of the training videos) for
    each sample, chosen by the sample's generator."""

    def __init__(self, frames: torch.Tensor) -> None:
        super().__init__()
        self.hparams.update(mode="image", latent_channels=4, reference_conditioning=False)
        self.frames = frames

    def sample(self, ef=None, generator=None, **options) -> torch.Tensor:
        picks = [int(torch.randint(len(self.frames), (1,), generator=g)) for g in generator]
        return self.frames[picks][:, None].to(self.device)

    def validation_step(self, batch, batch_idx) -> None:
        pass


class PlantedVideo(L.LightningModule):
    """A "video model" that, given a reference frame, returns the training clip that starts with it."""

    def __init__(self, clips: torch.Tensor) -> None:
        super().__init__()
        self.hparams.update(mode="video", latent_channels=4, reference_conditioning=True)
        self.clips = clips
        self.register_buffer("train_num_frames", torch.tensor(clips.shape[1]))

    def sample(self, ef=None, reference=None, **options) -> torch.Tensor:
        rows = [int(torch.nonzero((self.clips[:, 0] == frame.cpu()).flatten(1).all(1))[0]) for frame in reference]
        return self.clips[rows].to(self.device)

    def validation_step(self, batch, batch_idx) -> None:
        pass


@pytest.fixture(scope="module")
def planted_world(tmp_path_factory) -> SimpleNamespace:
    """18 training and 9 validation videos; the first 6 training videos (a third) are the ones planted."""
    out = tmp_path_factory.mktemp("planted_coverage")
    root = generate_phantom(out / "data", patients=30, videos_per_patient=1, seed=9, size=32, frames=(16, 20),
                            split_fractions=(0.6, 0.3, 0.1))
    encode_tiny_latents(root, out / "latents")
    data = dict(root=root, space="latent", latent_dir=str(out / "latents"), clip_length=FRAMES, batch_size=4)
    return SimpleNamespace(out=out, data=data, reid=save_cli_checkpoint(distance_reid(), out / "reid.ckpt"))


@pytest.mark.parametrize("mode", ["anatomy", "video"])
def test_a_generator_copying_a_third_of_the_training_set_covers_a_third_and_is_all_memorised(planted_world, tmp_path,
                                                                                            mode):
    share = 6
    callback = CoverageCallback(str(planted_world.reid), num_samples=36, k=2, cache_dir=str(tmp_path / "cache"))
    if mode == "anatomy":
        first = split_videos(planted_world, "train", clip_length=1, eval_start="first")["video"][:share, 0]
        module, data = PlantedAnatomy(first), {**planted_world.data, "sampling": "frames"}
    else:
        clips = split_videos(planted_world, "train")["video"][:share]  # the training clips the bank holds
        callback.anatomy = PlantedAnatomy(clips[:, 0])
        module, data = PlantedVideo(clips), planted_world.data
    values = validate(module, callback, tmp_path, data)
    assert len(callback.bank) == 18 and callback.mode == ("anatomy" if mode == "anatomy" else "synthetic")
    assert values["coverage"] == pytest.approx(share / 18)  # 36 samples, 18 training videos: 6 / min(18, 36)
    assert values["memorization_rate"] == 1.0 and values["memorized_coverage"] == pytest.approx(share / 18)
    assert values["coverage@36"] == values["coverage"] and values["coverage@9"] <= share / 9 + 1e-6
    assert "filtered_coverage" not in values  # the filter would keep none of them


# ------------------------------------------------------------------------------------------ fits and errors
def test_every_validation_of_a_fit_is_measured_but_not_the_sanity_check(world, tmp_path):
    torch.manual_seed(0)
    module = VideoDiffusionModule(**TINY_DIFFUSION, reference_dropout=0.1)
    callback = CoverageCallback(str(world.reid_ckpt), anatomy=str(world.lidm_ckpt), num_samples=3, steps=STEPS, k=2,
                                cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path, name="run"), callbacks=[callback],
                        max_epochs=2, limit_train_batches=2, num_sanity_val_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, EchoNetDataModule(**world.data))
    rows = [row for row in csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")) if row.get("val/tau")]
    assert [int(row["step"]) for row in rows] == [1, 3]  # 2 steps an epoch; the sanity check is not measured
    for row in rows:
        values = {name: float(row[f"val/{name}"]) for name in METRIC_NAMES if not name.startswith("ef_")}
        assert all(np.isfinite(list(values.values())))
        assert 0 < values["coverage"] <= 1 and 0 <= values["memorization_rate"] <= 1
    pictures = sorted(path.name for path in Path(trainer.logger.log_dir, "images").iterdir())
    assert pictures == [f"val_{name}_step{step:08d}.png" for name in ("coverage_curve", "coverage_scores")
                        for step in (2, 4)]
    assert callback.validations == 2 and not any(name.startswith("reid") for name in module.state_dict())


def test_refuses_models_and_thresholds_it_cannot_measure_with(world, tmp_path):
    pixel = ReIDModule(in_channels=1, layers=[1], block="basic", width=8)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[CoverageCallback(str(save_cli_checkpoint(pixel, tmp_path / "pixel.ckpt")))])
    with pytest.raises(ValueError, match="takes 1-channel frames.*latent space"):
        trainer.validate(world.diffusion, EchoNetDataModule(**world.data))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[CoverageCallback(str(world.reid_ckpt), ef_regressor=str(
                            save_cli_checkpoint(EFRegressorModule(in_channels=1, **TINY_EF), tmp_path / "ef.ckpt")))])
    with pytest.raises(ValueError, match="reads pixels; give the VAE"):
        trainer.validate(world.diffusion, EchoNetDataModule(**world.data))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[CoverageCallback(str(world.reid_ckpt), anatomy=str(world.lvdm_ckpt))])
    with pytest.raises(ValueError, match="lvdm.ckpt is a video model; an image-mode"):
        trainer.validate(world.diffusion, EchoNetDataModule(**world.data))
    with pytest.raises(FileNotFoundError, match="reid checkpoint missing.ckpt not found"):
        CoverageCallback("missing.ckpt")
    # A τ of another protocol is never used.
    datamodule = EchoNetDataModule(**world.data)
    datamodule.setup("fit")
    from lightning_modules.reid_embeddings import embed_split

    bank = embed_split(world.reid, datamodule, "train")
    calibration = Calibration(tau=0.0, protocol="clip:16", quantile=0.95, heldout="val", heldout_videos=5,
                              bank_videos=6, weights_checksum="", data=str(world.root))
    with pytest.raises(ProtocolMismatchError, match="calibrated under protocol clip:16, but videos are compared under "
                                                    "clip:4"):
        CoverageMeasures(world.reid, bank, calibration, "clip:4", ef=False)


@pytest.mark.slow
def test_ddp_validation_with_the_callback_logs_the_values_of_one_process(world, tmp_path):
    """`echo-lvdm validate` with the callback animating anatomy frames, 7 requests, measured as written (the VAE) and
    with FID/IS/FVD (stand-in extractors): 2 CPU processes (rank r samples requests r, r + 2, …; the 5 validation
    videos padded to 6; each embeds and feeds its shard of the training split) log what 1 process logs and the
    oracle computes."""
    from tests.helpers.extractors import save_stand_ins

    inception, i3d = save_stand_ins(tmp_path / "extractors")
    config = tmp_path / "validate.yaml"
    config.write_text(
        "model:\n  class_path: lightning_modules.diffusion.VideoDiffusionModule\n"
        "trainer:\n  callbacks:\n    - class_path: callbacks.coverage.CoverageCallback\n      init_args:\n"
        f"        reid: {world.reid_ckpt}\n        ef_regressor: {world.ef_ckpt}\n        anatomy: {world.lidm_ckpt}\n"
        f"        vae: {world.out / 'vae'}\n        inception: {inception}\n        i3d: {i3d}\n"
        f"        steps: {STEPS}\n        num_samples: 7\n        batch_size: 3\n        k: 2\n")
    values = {}
    for devices in (1, 2):
        log_dir = tmp_path / f"devices{devices}"
        command = [str(Path(sys.executable).with_name("echo-lvdm")), "validate", "--config", str(config),
                   "--data.root", str(world.root), "--data.space", "latent", "--data.latent_dir",
                   world.data["latent_dir"], "--data.clip_length", str(FRAMES), "--data.batch_size", "2",
                   "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                   "--trainer.strategy", "ddp" if devices > 1 else "auto", "--trainer.enable_progress_bar", "false",
                   "--trainer.default_root_dir", str(log_dir), "--ckpt_path", str(world.lvdm_ckpt)]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        values[devices] = {key: value for key, value in logged(log_dir).items() if key != "loss"}
    assert values[2] == pytest.approx(values[1], rel=1e-4, abs=1e-5)  # float32 sums in another order across 2 ranks
    expected = {**synthetic_oracle(world, 7, written=True), **generative_oracle(world, 7)}
    assert {"fid", "is", "fvd4", "real_fid"} <= set(expected)
    assert {name: values[1][name] for name in expected} == pytest.approx(expected, rel=1e-4, abs=1e-5)
