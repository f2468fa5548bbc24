"""`echo-lvdm evaluate` on planted synthetic folders: exact copies of k % of the training videos plus new phantom
patients give a memorisation rate and a memorised coverage equal to the planted fractions and flag exactly the
copies; a generator collapsed onto k % of the training set has coverage k; held-out real data covers far more than a
generator that repeats one video. The report, its figures and the per-video CSV are written."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from echo_lvdm.main import main
from tests.helpers.data import PLANTED_CLIP, read_filelist, write_filelist

CLIP = PLANTED_CLIP


def synthetic_folder(root: Path, copies: list[tuple[Path, dict]]) -> Path:
    """An EchoNet folder of the given (source folder, FileList row) videos, renamed syn_000…, Split TRAIN."""
    (root / "Videos").mkdir(parents=True)
    rows = []
    for number, (source, row) in enumerate(copies):
        name = f"syn_{number:03d}"
        shutil.copyfile(source / "Videos" / f"{row['FileName']}.avi", root / "Videos" / f"{name}.avi")
        rows.append({**row, "FileName": name, "Split": "TRAIN", "PatientID": name})
    write_filelist(root, rows)
    return root


def evaluate(planted: SimpleNamespace, synthetic: Path, out: Path, *extra: str) -> dict:
    code = main(["evaluate", "--real", str(planted.real), "--synthetic", str(synthetic), "--reid", str(planted.reid),
                 "--vae", str(planted.out / "vae"), "--out", str(out), "--clip-length", str(CLIP), "--k", "3",
                 "--cache-dir", str(planted.out / "cache"), *extra])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_planted_copies_are_the_memorised_ones(planted, tmp_path):
    copied = planted.train[:6]  # 30 % of the 20 training videos, plus 14 new patients
    sources = [(planted.real, row) for row in copied] + [(planted.new, row) for row in read_filelist(planted.new)]
    metrics = evaluate(planted, synthetic_folder(tmp_path / "synthetic", sources), tmp_path / "report",
                       "--ef", str(planted.ef))
    assert metrics["synthetic_videos"] == 20 and metrics["training_videos"] == 20
    assert metrics["memorization_rate"] == pytest.approx(6 / 20, abs=0.02)
    assert metrics["memorized_coverage"] == pytest.approx(0.30, abs=0.02)
    assert metrics["memorised_videos"] == [f"syn_{i:03d}" for i in range(6)]
    rows = list(csv.DictReader(open(tmp_path / "report" / "synthetic_scores.csv")))
    # Each copy's best match is the training video it was copied from.
    assert [row["BestMatch"] for row in rows[:6]] == [row["FileName"] for row in copied]
    assert all(row["Memorised"] == "False" for row in rows[6:])
    # EF faithfulness: the FileList EF requested, the regressor's reading, R² and MAE as numpy computes them.
    requested = np.array([float(row["EF"]) for _, row in sources])
    read = np.array([float(row["ReadEF"]) for row in rows])
    assert [float(row["RequestedEF"]) for row in rows] == pytest.approx(requested.tolist(), abs=1e-3)
    assert metrics["ef_mae"] == pytest.approx(np.abs(read - requested).mean(), abs=1e-3)
    r2 = 1 - ((read - requested) ** 2).sum() / ((requested - requested.mean()) ** 2).sum()
    assert metrics["ef_r2"] == pytest.approx(r2, abs=1e-3)
    # τ is the one stored beside the re-ID checkpoint for this protocol and data, and the report says so.
    assert (metrics["protocol"], metrics["tau"]) == ("clip:16", planted.tau)
    assert metrics["tau_calibration"]["source"].startswith("stored") and metrics["tau_calibration"]["quantile"] == 1.0
    # Coverage at sample counts up to |S| = 20: ¼ and ½ of |R| = 20, |H| = 10, and 20.
    assert {key for key in metrics if key.startswith("coverage@")} == {"coverage@5", "coverage@10", "coverage@20"}
    assert metrics["coverage@20"] == metrics["coverage"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| memorization_rate | 0.3 |" in report and "protocol `clip:16`" in report
    for figure in ("scores", "coverage", "hits", "pairs", "ef"):
        assert f"figures/{figure}.png" in report and (tmp_path / "report" / "figures" / f"{figure}.png").stat().st_size


def test_coverage_of_collapsed_generators_against_held_out_real(planted, tmp_path):
    subset = [(planted.real, planted.train[i % 6]) for i in range(20)]  # 20 videos, all copies of 6 training videos
    metrics = evaluate(planted, synthetic_folder(tmp_path / "subset", subset), tmp_path / "subset_report")
    assert metrics["coverage"] == pytest.approx(6 / 20, abs=0.02)
    one = [(planted.real, planted.train[0])] * 20
    collapsed = evaluate(planted, synthetic_folder(tmp_path / "one", one), tmp_path / "one_report")
    assert collapsed["coverage"] == pytest.approx(1 / 20)
    # Held-out real videos (10 test patients) spread over the training set: most of them find distinct matches.
    assert collapsed["reference_coverage"] >= 0.6 and collapsed["reference_coverage"] > 10 * collapsed["coverage"]
    assert collapsed["reference_coverage"] == metrics["reference_coverage"]


def test_evaluate_refuses_a_latent_reid_without_vae(planted, tmp_path):
    with pytest.raises(ValueError, match="works in latent space; give --vae"):
        main(["evaluate", "--real", str(planted.real), "--synthetic", str(planted.real), "--reid", str(planted.reid),
              "--out", str(tmp_path / "out")])


def test_fid_is_fvd_of_a_written_folder_equal_an_oracle(planted, tmp_path):
    """`evaluate --inception --i3d` with stand-in TorchScript extractors: FID/IS/FVD of the synthetic folder and of
    the held-out real split (the ground-truth row), each against real TRAIN, equal numpy/scipy on the stand-ins'
    features of the same videos read directly (first 16 frames at the native rate)."""
    import torch

    from datamodules.video_io import read_video
    from tests.helpers.extractors import oracle, save_stand_ins

    inception, i3d = save_stand_ins(tmp_path / "extractors")
    sources = [(planted.real, row) for row in planted.train[:6]] + [(planted.new, row)
                                                                   for row in read_filelist(planted.new)]
    synthetic = synthetic_folder(tmp_path / "synthetic", sources)
    metrics = evaluate(planted, synthetic, tmp_path / "report", "--inception", str(inception), "--i3d", str(i3d),
                       "--fvd-lengths", "16,8", "--fid-fps", "native", "--fid-size", "32")

    def clips(folder: Path, split: str | None) -> torch.Tensor:
        rows = [row for row in read_filelist(folder) if split is None or row["Split"] == split]
        return torch.from_numpy(np.stack([read_video(folder / "Videos" / f"{row['FileName']}.avi",
                                                     indices=np.arange(16)) for row in rows]))[:, :, None]

    train = clips(planted.real, "TRAIN")
    for prefix, videos in (("", clips(synthetic, None)), ("real_", clips(planted.real, "TEST"))):
        expected = oracle(train, videos, (8, 16))
        for name, value in expected.items():
            assert metrics[prefix + name] == pytest.approx(value, rel=1e-4, abs=1e-5), prefix + name
    assert metrics["fid"] > 0 and metrics["fvd16"] > 0 and metrics["real_fvd16"] > 0
    generative = metrics["generative_metrics"]
    assert generative["videos"] == {"TRAIN": {"videos": 20, "too_short": 0},
                                    "synthetic": {"videos": 20, "too_short": 0}, "TEST": {"videos": 10, "too_short": 0}}
    assert generative["extractors"]["i3d"]["sha256"] == hashlib.sha256(i3d.read_bytes()).hexdigest()
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"| fvd16 | {metrics['fvd16']:.4g} | FVD of 16-frame clips against real TRAIN (I3D features); real TEST: " \
           f"{metrics['real_fvd16']:.4g} |" in report

    # At 32 fps hardly any of the 20–24-frame 50 fps videos holds a 16-frame clip: a clear error, raised before the
    # re-ID embeds anything (its cache folder is never made).
    with pytest.raises(ValueError, match=r"need at least 2 videos of 16 frames at 32 fps in the TRAIN set, found "
                                         r"[01] \(\d+ too short\); lower --fvd-lengths or --fid-fps"):
        main(["evaluate", "--real", str(planted.real), "--synthetic", str(synthetic), "--reid", str(planted.reid),
              "--vae", str(planted.out / "vae"), "--out", str(tmp_path / "short"), "--clip-length", str(CLIP),
              "--cache-dir", str(tmp_path / "short_cache"), "--inception", str(inception)])
    assert not (tmp_path / "short_cache").exists()
