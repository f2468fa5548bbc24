"""The privacy audit: frame transforms do what they say; `echo-lvdm audit`'s per-canary scores and recall equal a
brute-force recount from independently rebuilt canaries; an untrained (distance) re-ID is reported as failing; no
canary file outlives a run, also when it is SIGKILLed; the synthetic writer records the audit and refuses below its
floors; augmented re-ID positives are the transformed pixel frames, encoded by the cache's VAE."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.augment import FrameTransform
from datamodules.datamodule import EchoNetDataModule
from echo_lvdm.main import main
from lightning_modules.privacy_audit import (
    DEFAULT_CANARIES,
    canary_sources,
    canary_start,
    make_canary,
    promised_false_flags,
    protocol_step,
    write_canary,
)
from lightning_modules.protocols import Protocol
from lightning_modules.reid import load_reid
from lightning_modules.reid_embeddings import EncodedReID
from lightning_modules.vae_utils import load_frozen_vae
from tests.helpers.cli import REPO
from tests.helpers.data import PLANTED_CLIP
from tests.helpers.processes import kill_when

SOURCES = 4


def test_frame_transforms_move_scale_and_blur_as_documented():
    frame = torch.full((1, 1, 16, 16), -1.0)
    frame[0, 0, 5, 4] = 1.0  # one white pixel at x = 4, y = 5
    moved = FrameTransform(shift=(3.0, 2.0)).apply(frame)
    assert moved[0, 0, 7, 7] == pytest.approx(1.0, abs=1e-5) and float(moved.sum()) == pytest.approx(float(frame.sum()))
    half = FrameTransform(shift=(0.5, 0.0)).apply(frame)  # bilinear: half in each of two columns
    assert (float(half[0, 0, 5, 4]), float(half[0, 0, 5, 5])) == pytest.approx((0.0, 0.0), abs=1e-5)
    assert torch.equal(FrameTransform().apply(frame), frame)
    gray = torch.zeros(1, 1, 8, 8)  # mid-gray: 0.5 on [0, 1]
    assert float(FrameTransform(gain=1.1).apply(gray).mean()) == pytest.approx(0.1, abs=1e-6)
    assert float(FrameTransform(gamma=2.0).apply(gray).mean()) == pytest.approx(-0.5, abs=1e-6)
    blurred = FrameTransform(blur=1.0).apply(frame)
    assert float(blurred.max()) < 0.0 and float((blurred + 1).sum()) == pytest.approx(2.0, rel=1e-3)
    noisy = FrameTransform(noise=8.0).apply(gray, torch.Generator().manual_seed(0))
    assert float(noisy.std()) * 127.5 == pytest.approx(8.0, rel=0.3)
    with pytest.raises(ValueError, match="noise needs a generator"):
        FrameTransform(noise=1.0).apply(gray)
    draws = [FrameTransform.random(np.random.default_rng(i)) for i in range(200)]
    assert max(abs(t.shift[0]) for t in draws) <= 4.5 and sum(t.noise > 0 for t in draws) in range(70, 130)


def audit(planted, out: Path, *extra: str) -> int:
    return main(["audit", "--real", str(planted.real), "--reid", str(planted.reid), "--vae", str(planted.out / "vae"),
                 "--protocol", f"clip:{PLANTED_CLIP}", "--sources", str(SOURCES), "--out", str(out),
                 "--cache-dir", str(planted.out / "cache"), *extra])


def test_audit_recall_equals_a_brute_force_recount_and_an_untrained_reid_fails(planted, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    code = audit(planted, tmp_path / "audit", "--scratch", str(scratch))
    assert list(scratch.iterdir()) == []  # the canary folder is gone
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    # A distance in random features catches exact copies but not every near-copy: the audit says it fails.
    assert code == 1 and not summary["passed"] and summary["failures"]
    assert summary["recall"]["exact"]["recall"] == 1.0 and summary["min_single_recall"] < 0.99
    assert summary["tau"] == planted.tau and summary["canaries"] == SOURCES * len(DEFAULT_CANARIES)
    rows = list(csv.DictReader(open(tmp_path / "audit" / "audit_scores.csv")))
    text = (tmp_path / "audit" / "audit_scores.csv").read_text() + (tmp_path / "audit" / "audit.json").read_text()
    assert not any(row["FileName"] in text for row in planted.train)  # scores only, no training file names

    # Recount: rebuild each canary from the same recipe, embed it, and take the best head logit over every frame
    # pair with every training video, one pair at a time.
    reid = load_reid(planted.reid)
    model = EncodedReID(reid, load_frozen_vae(planted.out / "vae"))
    protocol = Protocol.parse(f"clip:{PLANTED_CLIP}")
    real = EchoNetDataModule(planted.real, pad="reflect", **protocol.data_options())
    real.setup("fit")
    records = real.datasets["train"].records
    with torch.no_grad():
        bank = [model.embed_videos(real.datasets["train"][i]["video"][None])[0] for i in range(len(records))]
        recount = {}
        for number, source in enumerate(canary_sources(len(records), SOURCES, seed=0)):
            from datamodules.video_io import read_video

            video = read_video(records[source].path)
            step = protocol_step(protocol, records[source].fps)
            start = canary_start(len(video), protocol.length, step, seed=0, number=number)
            for c, canary in enumerate(DEFAULT_CANARIES):
                generator = torch.Generator().manual_seed(number * 1_009 + c)
                frames = make_canary(video, canary, length=protocol.length, step=step, start=start, number=number,
                                     generator=generator)
                written = write_canary(tmp_path / "recount.avi", frames, records[source].fps / step, canary)
                from datamodules.dataset import to_model_range

                query = model.embed_videos(to_model_range(written)[None])[0]
                best, best_video = -np.inf, None
                for j, frames_j in enumerate(bank):
                    for q in query:
                        for b in frames_j:
                            score = float(reid.score(q[None], b[None]))
                            if score > best:
                                best, best_video = score, j
                recount[(canary.name, number)] = (best, best_video == source)
    assert len(rows) == SOURCES * len(DEFAULT_CANARIES) + 10  # and the 10 held-out TEST videos
    for row in rows[:len(recount)]:
        best, own = recount[(row["Canary"], int(row["Source"]))]
        assert float(row["Score"]) == pytest.approx(best, abs=1e-5)
        assert row["Flagged"] == str(best > planted.tau) and row["BestIsSource"] == str(own)
    for name, entry in summary["recall"].items():
        caught = sum(recount[(name, n)][0] > planted.tau for n in range(SOURCES))
        assert entry["flagged"] == caught and entry["recall"] == caught / SOURCES
    assert (tmp_path / "audit" / "figures" / "audit.png").stat().st_size > 0


@pytest.mark.parametrize(("calibration", "heldout"), [(18, 18), (36, 36), (72, 72)])
def test_the_false_flag_checks_power_equals_a_simulation_of_exchangeable_videos(calibration, heldout):
    """How often a τ that keeps its promise still shows more than 0.10 false flags: draw calibration and held-out
    scores of one distribution, set the conformal τ, count — the audit's closed form must agree."""
    rng = np.random.default_rng(0)
    runs = 40_000
    calibration_scores = np.sort(rng.random((runs, calibration)), axis=1)
    k = min(calibration, int(np.ceil((calibration + 1) * 0.95 - 1e-9)))
    tau = calibration_scores[:, k - 1]
    rate = (rng.random((runs, heldout)) > tau[:, None]).mean(axis=1)
    simulated = float((rate > 0.10 + 1e-12).mean())
    promise = promised_false_flags(calibration, 0.95, heldout=heldout, max_false_flags=0.10, draws=1000)
    assert promise["chance_over_floor"] == pytest.approx(simulated, abs=0.006)
    assert promise["mean_at_most"] == pytest.approx(rate.mean(), abs=0.002)


def test_no_canary_outlives_a_killed_audit(planted, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "echo_lvdm", "audit", "--real", str(planted.real), "--reid", str(planted.reid),
         "--vae", str(planted.out / "vae"), "--protocol", f"clip:{PLANTED_CLIP}", "--sources", str(SOURCES),
         "--out", str(tmp_path / "audit"), "--cache-dir", str(planted.out / "cache"), "--scratch", str(scratch)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: any(scratch.glob("*/canary_*")), timeout=300)
    deadline = time.monotonic() + 30
    while list(scratch.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "audit" / "audit.json").exists()


def test_augmented_positives_are_transformed_pixel_frames_encoded_by_the_cache_vae(phantom_root, tmp_path):
    from datamodules.dataset import to_model_range
    from datamodules.video_io import read_video
    from lightning_modules import ReIDModule
    from tests.helpers.data import encode_tiny_latents
    from tests.helpers.models import TINY_REID

    export = tmp_path / "vae"
    latents = encode_tiny_latents(phantom_root, tmp_path / "latents", size=64, export=export)
    data = EchoNetDataModule(phantom_root, space="latent", latent_dir=latents, latent_posterior="mean",
                             sampling="frames", num_frames=3, augment_frames=2, batch_size=4)
    data.setup("fit")
    dataset = data.datasets["train"]
    key = (5, 0, 1)  # (index, seed, epoch), as the training sampler gives
    item = dataset[key]
    assert item["video"].shape[:2] == (3, 4) and item["augmented"].shape == (2, 1, 64, 64)
    # The oracle: the item's first two planned frames, read in pixels, each under the transform its key draws.
    plan, _ = dataset.frame_plan(key)
    pixels = to_model_range(read_video(dataset.records[5].path, indices=plan[:2]))
    rng = dataset.generator(key, 3)
    expected = torch.cat([FrameTransform.random(rng).apply(frame[None], torch.Generator().manual_seed(
        int(rng.integers(2**62)))) for frame in pixels])
    assert torch.equal(item["augmented"], expected) and torch.equal(dataset[key]["augmented"], expected)
    assert "augmented" not in data.datasets["val"][0]
    # The model encodes them with its VAE (posterior mean × scaling factor), as the cache holds its frames.
    module = ReIDModule(**{**TINY_REID, "in_channels": 4}, augment_vae=str(export))
    module.setup("fit")
    views = module.augmented_views(item["augmented"][None])
    vae = load_frozen_vae(export)
    with torch.no_grad():
        direct = vae.encode(item["augmented"]).latent_dist.mean * float(vae.config.scaling_factor)
    assert torch.allclose(views[0], direct, atol=1e-5)
    with torch.no_grad():  # untransformed, the first frame encodes to its cached latent (stored in float16)
        cached = module.augmented_views(pixels[:1][None])[0, 0]
    assert torch.allclose(cached, item["video"][0], atol=1e-2 * float(cached.abs().max()))
    plain = ReIDModule(**{**TINY_REID, "in_channels": 4})
    with pytest.raises(ValueError, match="set model.augment_vae"):
        plain.augmented_views(item["augmented"][None])


def test_a_negative_head_scores_copies_at_the_ceiling_and_searches_exactly():
    from lightning_modules import ReIDModule
    from tests.helpers.models import TINY_REID

    torch.manual_seed(0)
    model = ReIDModule(**TINY_REID, head="negative")
    with torch.no_grad():
        model.head.raw_weight.normal_()
    assert bool((model.head.weight < 0).all())
    queries, bank = torch.rand(5, 16), torch.rand(40, 16)
    bank[7] = queries[2]
    values, rows = model.search(queries, bank)
    brute = torch.stack([torch.stack([model.score(q[None], b[None])[0] for b in bank]) for q in queries])
    assert torch.allclose(values, brute.max(dim=1).values, atol=1e-5) and torch.equal(rows, brute.argmax(dim=1))
    # An identical embedding is the best match and scores the bias: nothing scores above a copy.
    assert int(rows[2]) == 7 and float(values[2]) == pytest.approx(float(model.head.bias), abs=1e-6)
    assert float(brute.max()) <= float(model.head.bias) + 1e-6
    with pytest.raises(ValueError, match="head must be"):
        ReIDModule(**TINY_REID, head="cosine")
