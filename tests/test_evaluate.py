"""`echo-lvdm evaluate` on planted synthetic folders: exact copies of k % of the training videos plus new phantom
patients give a memorisation rate and a memorised coverage equal to the planted fractions and flag exactly the
copies; a generator collapsed onto k % of the training set has coverage k; held-out real data covers far more than a
generator that repeats one video. The report, its figures and the per-video CSV are written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from datamodules.datamodule import EchoNetDataModule
from lightning_modules.cli import main
from lightning_modules.ef_regressor import EFRegressorModule
from lightning_modules.evaluate_cli import EncodedReID
from lightning_modules.reid_embeddings import embed_split
from tests.conftest import save_cli_checkpoint, write_filelist
from tests.test_coverage_callback import distance_reid
from tests.test_ef_regressor import TINY as TINY_EF

SIZE, CLIP = 32, 16


def read_filelist(root: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(root / "FileList.csv")))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> SimpleNamespace:
    """A 40-patient real phantom (20 train / 10 val / 10 test), 14 new phantom patients, a random tiny VAE and a
    distance re-ID calibrated on the 20 held-out videos."""
    from datamodules.phantom import generate_phantom

    out = tmp_path_factory.mktemp("evaluate")
    real = generate_phantom(out / "real", patients=40, videos_per_patient=1, seed=21, size=SIZE, frames=(20, 24),
                            split_fractions=(0.5, 0.25, 0.25))
    new = generate_phantom(out / "new", patients=14, videos_per_patient=1, seed=22, size=SIZE, frames=(20, 24))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        norm_num_groups=8, mid_block_add_attention=False, sample_size=SIZE)
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    # τ = the highest held-out score (quantile 1): at the default 0.95, 5 % of new patients would count as
    # memorised by construction, and the planted fractions would be off by that much.
    reid = distance_reid()
    model = EncodedReID(reid, vae.eval())
    datamodule = EchoNetDataModule(real, clip_length=CLIP, pad="reflect", batch_size=8)
    with torch.no_grad():
        bank = embed_split(model, datamodule, "train")
        heldout = [embed_split(model, datamodule, split) for split in ("val", "test")]
        best = torch.cat([reid.video_search(split.embedding, bank.embedding)[0] for split in heldout])
    reid.tau.fill_(float(best.max()))
    reid.tau_quantile.fill_(1.0)
    train = [row for row in read_filelist(real) if row["Split"] == "TRAIN"]
    regressor = EFRegressorModule(in_channels=1, **TINY_EF)
    with torch.no_grad():
        regressor.network.fc.bias.fill_(50.0)
    return SimpleNamespace(out=out, real=real, new=new, train=train, reid=save_cli_checkpoint(reid, out / "reid.ckpt"),
                           ef=save_cli_checkpoint(regressor, out / "ef.ckpt"))


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
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| memorization_rate | 0.3 |" in report
    for figure in ("scores", "hits", "pairs", "ef"):
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
