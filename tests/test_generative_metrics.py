"""FID, IS and FVD (lightning_modules/metrics/generative.py) with stand-in TorchScript extractors of the real files'
interfaces: each number equals a numpy/scipy computation from the stand-ins' features (FID and FVD: Fréchet distance
of the Gaussian fits; IS: StyleGAN-V's split rule), the real set's statistics survive a reset of the synthetic one,
and missing or wrong extractor files get errors that say what to download."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.errors import UserInputError
from lightning_modules.metrics.generative import (I3D, I3D_URL, INCEPTION, INCEPTION_URL, GenerativeMetrics,
                                                 load_extractor)
from tests.helpers.extractors import oracle, save_stand_ins


def videos(seed: int, count: int, frames: int = 16, size: int = 16, brighter: int = 0) -> torch.Tensor:
    """uint8 grey videos (count, frames, 1, size, size): a moving bright square on noise."""
    rng = np.random.default_rng(seed)
    clips = rng.integers(0, 120, size=(count, frames, 1, size, size)) + brighter
    for video, (row, col, speed) in enumerate(zip(rng.integers(0, size // 2, count), rng.integers(0, size // 2, count),
                                                  rng.integers(0, 3, count))):
        for t in range(frames):
            c = (col + speed * t) % (size // 2)
            clips[video, t, 0, row:row + size // 2, c:c + size // 2] += 100
    return torch.from_numpy(np.clip(clips, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    inception, i3d = save_stand_ins(tmp_path_factory.mktemp("extractors"))
    return load_extractor(inception, INCEPTION), load_extractor(i3d, I3D)


def test_metrics_equal_scipy_on_the_extractor_features(extractors):
    real, fake = videos(0, 40), videos(1, 30, brighter=20)
    metrics = GenerativeMetrics(*extractors, fvd_lengths=(8, 16), frame_size=(16, 16))
    assert metrics.frames_needed == 16 and metrics.fid.inception.num_features == 6
    for part in real.split(7):  # batches of uneven size
        metrics.update(part, real=True)
    for part in fake.split(9):
        metrics.update(part, real=False)
    values, expected = metrics.compute(), oracle(real, fake, (8, 16))
    assert set(values) == set(expected) == {"fid", "is", "is_std", "fvd8", "fvd16"}
    for name in expected:
        assert values[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name
    assert values["fid"] > 0.01 and values["fvd16"] > 0.01 and values["fvd8"] != values["fvd16"]
    assert 1.0 < values["is"] < 5.0

    # The real set's statistics stay across reset_synthetic: a second set against the same reference.
    metrics.reset_synthetic()
    same = videos(0, 40)
    metrics.update(same, real=False)
    again = metrics.compute()
    assert again["fid"] == pytest.approx(0.0, abs=1e-5) and again["fvd16"] == pytest.approx(0.0, abs=1e-5)
    assert again["is"] == pytest.approx(oracle(real, same, ())["is"], rel=1e-5)


def test_is_splits_follow_the_given_order_not_the_order_of_the_calls(extractors):
    fake = videos(1, 30, frames=2)
    expected = oracle(videos(0, 4, frames=2), fake, ())["is"]
    metrics = GenerativeMetrics(extractors[0], None, frame_size=(16, 16))
    metrics.update(videos(0, 4, frames=2), real=True)
    for places in torch.arange(30).flip(0).split(7):  # fed last first, each batch with its places
        metrics.update(fake[places], real=False, order=places)
    assert metrics.compute()["is"] == pytest.approx(expected, rel=1e-6)
    metrics.reset_synthetic()
    metrics.update(fake.roll(1, 0), real=False)  # without places: the order of the calls, here moved by one
    assert metrics.compute()["is"] != pytest.approx(expected, rel=1e-6)


def test_is_is_left_out_below_one_frame_per_split(extractors, caplog):
    metrics = GenerativeMetrics(extractors[0], None, frame_size=(16, 16))
    metrics.update(videos(0, 4, frames=2), real=True)
    metrics.update(videos(1, 4, frames=2), real=False)  # 8 frames, 10 splits
    values = metrics.compute()
    assert set(values) == {"fid"} and "IS left out: IS needs at least 10 frames (one per split), got 8" in caplog.text


def test_temporal_order_moves_fvd_not_fid(extractors):
    real = videos(0, 40)
    shuffled = real[:, torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    metrics = GenerativeMetrics(*extractors, fvd_lengths=(16,), frame_size=(16, 16))
    metrics.update(real, real=True)
    metrics.update(shuffled, real=False)
    values = metrics.compute()
    assert values["fid"] == pytest.approx(0.0, abs=1e-5)  # the same frames
    assert values["fvd16"] > 1e-3  # in another order


def test_extractor_files_are_checked(tmp_path):
    with pytest.raises(UserInputError, match="Inception weights not found.*" + INCEPTION_URL.replace(".", r"\.")):
        load_extractor(tmp_path / "inception-2015-12-05.pt", INCEPTION)
    with pytest.raises(UserInputError, match="--i3d"):
        load_extractor(None, I3D)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "state.pt")
    with pytest.raises(UserInputError, match="not a TorchScript archive.*not a pickle or a state dict"):
        load_extractor(tmp_path / "state.pt", I3D)
    inception, i3d = save_stand_ins(tmp_path / "stand_ins")
    with pytest.raises(UserInputError, match=r"forward takes \(img, return_features, use_fp16, no_output_bias\), "
                                             r"not the I3D interface \(rescale, resize, return_features\).*dropbox"):
        load_extractor(inception, I3D)
    assert I3D_URL in I3D.missing(None)


def test_bad_videos_and_too_short_clips_are_refused(extractors):
    metrics = GenerativeMetrics(*extractors, fvd_lengths=(16,), frame_size=(16, 16))
    with pytest.raises(ValueError, match="expected uint8 videos"):
        metrics.update(videos(0, 2).float(), real=True)
    with pytest.raises(ValueError, match="FVD16 needs clips of 16 frames, got 8"):
        metrics.update(videos(0, 2, frames=8), real=True)


def test_an_extractor_that_cannot_take_the_clips_fails_at_setup(tmp_path):
    _, i3d = save_stand_ins(tmp_path, i3d_min_frames=9)  # as the Kinetics I3D's temporal pooling
    with pytest.raises(UserInputError, match=r"I3DFeatures extractor fails on an input of shape \(1, 3, 8, 16, 16\) "
                                             r"\(the Kinetics I3D needs at least 9 frames\): .*too small"):
        GenerativeMetrics(None, load_extractor(i3d, I3D), fvd_lengths=(16, 8), frame_size=(16, 16))
    assert GenerativeMetrics(None, load_extractor(i3d, I3D), fvd_lengths=(9,), frame_size=(16, 16)).frames_needed == 9
