"""τ per protocol: held-out real videos scored as samples are memorised at about 1 − q under every protocol (τ from
other held-out videos of the same protocol); `echo-lvdm calibrate` equals a brute-force oracle and stores τ where
`evaluate` and the writer find it; protocols parse and name themselves."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from callbacks.coverage_measures import CoverageMeasures
from datamodules import EchoNetDataModule, generate_phantom
from echo_lvdm.main import main
from lightning_modules.calibration import calibrate, calibrations_path, find_calibration, stored_calibrations
from lightning_modules.protocols import Protocol
from lightning_modules.reid_embeddings import embed_split
from tests.helpers.models import conformal_quantile, distance_reid, save_cli_checkpoint

PROTOCOLS = ["first_frame", "frames:3", "clip:8", "clip:8/p2", "clip:6@25fps"]


def test_protocols_parse_and_name_themselves():
    for name in PROTOCOLS:
        assert Protocol.parse(name).name == name
    assert Protocol.parse("paper") == Protocol("first_frame")
    assert Protocol.of_data({"sampling": "frames", "num_frames": 4}).name == "frames:4"
    assert Protocol.of_data({"sampling": "clip", "clip_length": 16, "period": 4, "fps": None}).name == "clip:16/p4"
    with pytest.raises(ValueError, match="unknown protocol 'clip:x'"):
        Protocol.parse("clip:x")
    videos = torch.arange(2 * 6).float().view(2, 6, 1, 1, 1)
    assert Protocol.parse("first_frame").frames_of(videos, torch.arange(2)).flatten().tolist() == [0.0, 6.0]
    assert Protocol.parse("clip:4").frames_of(videos, torch.arange(2)).shape[1] == 4
    picked = Protocol.parse("frames:3").frames_of(videos, torch.arange(2))
    assert picked.shape[1] == 3 and all(len(set(row.flatten().tolist())) == 3 for row in picked)


@pytest.fixture(scope="module", params=[101, 102], ids=lambda seed: f"phantom{seed}")
def held_out(request, tmp_path_factory) -> SimpleNamespace:
    """1,500 single-video patients: 300 training, 600 validation and 600 test videos (32 px, 12–16 frames)."""
    root = generate_phantom(tmp_path_factory.mktemp("held_out") / "data", patients=1500, videos_per_patient=1,
                            seed=request.param, size=32, frames=(12, 16), split_fractions=(0.2, 0.4, 0.4),
                            workers=2)  # byte-identical to workers=0
    return SimpleNamespace(root=root, reid=distance_reid(in_channels=1))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_held_out_videos_scored_as_samples_are_memorised_at_about_one_minus_q(held_out, protocol):
    """τ at q = 0.95 from the validation videos; the test videos — new patients, as a private generator's samples
    would be — are then flagged about 5 % of the time, whatever frames the protocol compares."""
    reid, protocol = held_out.reid, Protocol.parse(protocol)
    data = EchoNetDataModule(held_out.root, batch_size=64, **protocol.data_options())
    bank, val, test = (embed_split(reid, data, split) for split in ("train", "val", "test"))
    calibration = calibrate(reid, bank, val, quantile=0.95, protocol=protocol, heldout_name="val",
                            weights_checksum=reid.weights_checksum(), data=held_out.root)
    measures = CoverageMeasures(reid, bank, calibration, protocol, ef=False)
    measures.update_synthetic(test.index, test.embedding)
    rate = float(measures.compute()[0]["memorization_rate"])
    assert 0.02 <= rate <= 0.10, f"{protocol.name}: {rate:.3f} of 600 held-out videos above τ"


def brute_force_tau(reid, root: Path, protocol: Protocol, split: str, quantile: float,
                    rule: str = "conformal") -> float:
    """Each held-out video's best logit over all its frames × every frame of every training video, then the
    ⌈(n + 1)q⌉-th smallest (conformal), or numpy's interpolated quantile (linear: the seed paper's)."""
    data = EchoNetDataModule(root, batch_size=64, **protocol.data_options())
    data.setup("fit")
    data.setup("test")
    with torch.no_grad():
        bank = torch.cat([reid.embed_videos(b["video"]) for b in data.eval_dataloader("train")]).flatten(0, 1).double()
        queries = torch.cat([reid.embed_videos(b["video"]) for b in data.eval_dataloader(split)]).double()
    weight, bias = reid.head.weight.detach().double().reshape(-1), float(reid.head.bias)
    best = [float(((video[:, None] - bank[None]).abs() @ weight).max()) + bias for video in queries]
    return conformal_quantile(best, quantile) if rule == "conformal" else float(np.quantile(best, quantile))


def test_calibrate_command_equals_a_brute_force_oracle_and_stores_tau_per_protocol(tmp_path):
    root = generate_phantom(tmp_path / "data", patients=40, videos_per_patient=1, seed=4, size=32, frames=(12, 16),
                            split_fractions=(0.5, 0.25, 0.25))
    reid = distance_reid(in_channels=1, quantile=0.9)
    checkpoint = save_cli_checkpoint(reid, tmp_path / "reid.ckpt")
    for protocol in ("first_frame", "frames:3", "clip:8/p2"):
        assert main(["calibrate", "--reid", str(checkpoint), "--data.root", str(root), "--protocol", protocol]) == 0
    assert main(["calibrate", "--reid", str(checkpoint), "--real", str(root), "--protocol", "paper"]) == 0
    entries = stored_calibrations(checkpoint)
    assert [(entry.protocol, entry.heldout) for entry in entries] == [
        ("first_frame", "val"), ("frames:3", "val"), ("clip:8/p2", "val"), ("first_frame", "test")]
    for entry in entries:
        protocol = Protocol.parse(entry.protocol)
        expected = brute_force_tau(reid, root, protocol, entry.heldout, 0.9, entry.rule)
        assert entry.rule == ("linear" if entry.heldout == "test" else "conformal")  # `paper`: the seed paper's
        assert entry.tau == pytest.approx(expected, abs=1e-5), entry
        assert (entry.quantile, entry.heldout_videos, entry.bank_videos) == (0.9, 10, 20)
    # Found by what it was calibrated for, and only that; calibrating again replaces the entry.
    found = find_calibration(checkpoint, protocol="clip:8/p2", quantile=0.9, weights_checksum=reid.weights_checksum()
                             + "+", data=root)
    assert found is not None and found.protocol == "clip:8/p2"
    assert find_calibration(checkpoint, protocol="clip:8", quantile=0.9, weights_checksum=found.weights_checksum,
                            data=root) is None
    assert find_calibration(checkpoint, protocol="clip:8/p2", quantile=0.95, weights_checksum=found.weights_checksum,
                            data=root) is None
    assert main(["calibrate", "--reid", str(checkpoint), "--real", str(root), "--protocol", "frames:3"]) == 0
    assert len(json.loads(calibrations_path(checkpoint).read_text())["calibrations"]) == 4
