"""Re-identification: exact chunked search, τ against a brute-force oracle, a filter that refuses without τ, pairs,
patient-grouped batches, embedding caches, a model that learns identity, and DDP evaluation equal to one process."""

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from callbacks.checkpoint import Checkpoint
from datamodules import EchoNetDataModule
from datamodules.sampler import EpochSampler, interleave_for_ranks
from lightning_modules.metrics import IndexedCat
from lightning_modules.protocols import ProtocolMismatchError
from lightning_modules.reid import NotCalibratedError, ReIDModule, load_reid
from lightning_modules.reid_embeddings import EmbeddedSplit, embed_split
from lightning_modules.reid_search import (
    CROSS_VIDEO,
    NEGATIVE,
    SAME_VIDEO,
    evaluation_pairs,
    hardest_negatives,
    max_scores,
    training_pairs,
)
from tests.helpers.cli import REPO
from tests.helpers.models import TINY_REID


def brute_force_best(queries: torch.Tensor, bank: torch.Tensor, head: torch.nn.Linear):
    """The head itself applied to every (query, bank) pair, one query at a time, in float64."""
    head = copy.deepcopy(head).double()
    scores = torch.stack([head((query[None] - bank).abs()).squeeze(1) for query in queries.double()])
    return scores.max(dim=1)


def random_head(dim: int, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    head = torch.nn.Linear(dim, 1).requires_grad_(False)
    head.weight.normal_()  # mixed signs: both halves of the search's L1 split are used
    return head


@pytest.mark.parametrize("max_elements", [64, 1000, 2**24])  # chunking bank and queries, queries only, nothing
def test_chunked_search_equals_brute_force(max_elements):
    generator = torch.Generator().manual_seed(0)
    queries, bank = torch.rand(300, 24, generator=generator), torch.rand(170, 24, generator=generator)
    head = random_head(24, 1)
    values, indices = max_scores(queries, bank, head.weight, head.bias, max_elements=max_elements)
    oracle_values, oracle_indices = brute_force_best(queries, bank, head)
    assert torch.equal(indices, oracle_indices)
    torch.testing.assert_close(values.double(), oracle_values, atol=1e-5, rtol=1e-6)
    # In float64 the search and the head agree to rounding.
    values64, indices64 = max_scores(queries.double(), bank.double(), head.weight, head.bias, max_elements=max_elements)
    assert torch.equal(indices64, oracle_indices)
    torch.testing.assert_close(values64, oracle_values, atol=1e-12, rtol=0)


def test_search_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must share D"):
        max_scores(torch.rand(3, 4), torch.rand(5, 6), torch.rand(4), torch.rand(1))
    with pytest.raises(ValueError, match="bank is empty"):
        max_scores(torch.rand(3, 4), torch.rand(0, 4), torch.rand(4), torch.rand(1))


def test_tau_equals_brute_force_and_filter_refuses_without_it():
    torch.manual_seed(0)
    module = ReIDModule(**TINY_REID, quantile=0.9, search_max_elements=50).requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    heldout = EmbeddedSplit(torch.arange(11), torch.rand(11, 3, 16, generator=generator), torch.arange(11))
    bank = EmbeddedSplit(torch.arange(20), torch.rand(20, 2, 16, generator=generator), torch.arange(20))

    # Oracle: every held-out video's best score over all its frames × all bank frames, then numpy's quantile.
    best = [max(float(module.head((h[None] - bank.embedding.reshape(-1, 16)).abs()).max()) for h in frames)
            for frames in heldout.embedding]
    assert module.threshold_from(heldout, bank) == pytest.approx(np.quantile(best, 0.9), abs=1e-5)

    queries = torch.rand(7, 3, 16, generator=generator)
    with pytest.raises(NotCalibratedError, match="no privacy threshold"):
        module.privacy_filter(queries, bank.embedding, "frames:3")
    module.tau.fill_(float(np.quantile(best, 0.9)))
    module.tau_protocol = "frames:3"
    with pytest.raises(ProtocolMismatchError, match="calibrated under protocol frames:3, but videos are compared "
                                                    "under clip:16"):
        module.privacy_filter(queries, bank.embedding, "clip:16")  # a τ of another protocol is refused
    keep, scores = module.privacy_filter(queries, bank.embedding, "frames:3")
    oracle = [max(float(module.head((q[None] - bank.embedding.reshape(-1, 16)).abs()).max()) for q in frames)
              for frames in queries]
    torch.testing.assert_close(scores, torch.tensor(oracle), atol=1e-5, rtol=0)
    assert keep.tolist() == [score <= float(module.tau) for score in oracle]
    # The bank video giving the best score is the oracle's.
    _, video = module.video_search(queries, bank.embedding)
    for query, found in zip(queries, video.tolist(), strict=True):
        per_video = [float(module.head((query[:, None] - b[None]).abs()).max()) for b in bank.embedding]
        assert found == int(np.argmax(per_video))


def test_layout_branch_adds_the_pooled_frame_and_enters_the_checksum():
    torch.manual_seed(0)
    module = ReIDModule(**{**TINY_REID, "in_channels": 4}, layout_grid=2).requires_grad_(False)
    frames = torch.rand(3, 4, 8, 8)
    normalised = module.normalize(frames)
    cells = torch.nn.functional.adaptive_avg_pool2d(normalised, 2).flatten(1)  # (3, 4 · 2 · 2)
    expected = torch.sigmoid(module.encoder(normalised) + cells @ module.layout.weight.T + module.layout.bias)
    torch.testing.assert_close(module.embed(frames), expected)
    checksum = module.weights_checksum()
    module.layout.weight.add_(0.01)  # caches of embeddings must not survive a change of the layout weights
    assert module.weights_checksum() != checksum
    assert ReIDModule(**TINY_REID).layout is None  # off by default
    with pytest.raises(ValueError, match="layout_grid"):
        ReIDModule(**TINY_REID, layout_grid=-1)


def test_training_pairs_prefer_other_videos_and_are_balanced():
    patient, index = torch.tensor([7, 7, 8, 9, 9, 9]), torch.tensor([0, 1, 2, 3, 4, 5])
    first, second, label = training_pairs(patient, index, num_frames=3, generator=torch.Generator().manual_seed(0))
    assert int(label.sum()) == len(label) - int(label.sum()) == 6 * 3
    for (a, fa), (b, fb), positive in zip(first.tolist(), second.tolist(), label.tolist(), strict=True):
        if positive:
            assert patient[a] == patient[b]
            if a == 2:  # patient 8 has one video: the positive is another frame of it
                assert b == 2 and fa != fb
            else:
                assert b != a  # patients 7 and 9 have other videos in the batch
        else:
            assert patient[a] != patient[b]


def test_hard_negatives_are_the_best_scoring_frames_of_other_patients():
    torch.manual_seed(0)
    patient, index = torch.tensor([7, 7, 8, 9, 9, 9]), torch.arange(6)
    embedding, head = torch.rand(6, 3, 16), random_head(16, seed=1)
    first, second, label = training_pairs(patient, index, num_frames=3, generator=torch.Generator().manual_seed(0))
    negative = label == 0
    hard = hardest_negatives(embedding, patient, first[negative], head.weight, head.bias)
    for (a, fa), (b, fb) in zip(first[negative].tolist(), hard.tolist(), strict=True):  # oracle: every other frame
        best = max(float(head((embedding[a, fa] - embedding[j, g]).abs()))
                   for j in range(6) for g in range(3) if patient[j] != patient[a])
        assert patient[b] != patient[a]
        assert float(head((embedding[a, fa] - embedding[b, fb]).abs())) == pytest.approx(best, abs=1e-6)

    module = ReIDModule(**TINY_REID, hard_negatives=1.0)
    module.head = head
    hardened = module._harden(embedding, patient, first, second, label, torch.Generator().manual_seed(0))
    assert torch.equal(hardened[negative], hard) and torch.equal(hardened[~negative], second[~negative])
    module.hparams.hard_negatives = 0.5  # about half of the 18 negatives, the positives untouched
    hardened = module._harden(embedding, patient, first, second, label, torch.Generator().manual_seed(0))
    replaced = (hardened != second).any(dim=1)
    assert not replaced[~negative].any() and 3 <= int(replaced.sum()) <= 15
    with pytest.raises(ValueError, match="hard_negatives"):
        ReIDModule(**TINY_REID, hard_negatives=1.5)


def test_evaluation_pairs_are_fixed_and_cover_both_kinds():
    patient = torch.tensor([1, 1, 1, 2, 3, 3])
    first, second, kind = evaluation_pairs(patient, num_frames=2, seed=0)
    again = evaluation_pairs(patient, num_frames=2, seed=0)
    assert all(torch.equal(x, y) for x, y in zip((first, second, kind), again, strict=True))
    assert int((kind == SAME_VIDEO).sum()) == 6 and int((kind == CROSS_VIDEO).sum()) == 3 + 1
    assert int((kind == NEGATIVE).sum()) == 10
    same = patient[first[:, 0]] == patient[second[:, 0]]
    assert torch.equal(same, kind != NEGATIVE)


def test_grouped_sampler_keeps_patients_together_on_every_rank():
    groups = [i // 3 for i in range(20)]  # 7 patients, up to 3 videos each
    sampler = EpochSampler(20, seed=4, groups=groups)
    order = [index for index, _, _ in sampler]
    assert sorted(order) == list(range(20))
    runs = [groups[i] for i in order]
    assert runs == sorted(runs, key=runs.index)  # each patient's videos form one run
    laid_out = interleave_for_ranks(np.array(order), 3)
    pieces = [laid_out[rank::3].tolist() for rank in range(3)]
    assert sum(pieces, []) == order  # rank r's round-robin share is one contiguous piece of the grouped order
    # Distributed, the sampler deals those shares itself (Lightning does not re-wrap a DistributedSampler, whose
    # reshuffling would split patients): rank r gets piece r, whole patients in a row.
    shards = [[index for index, _, _ in EpochSampler(20, seed=4, groups=groups, num_replicas=3, rank=rank)]
              for rank in range(3)]
    assert [len(shard) for shard in shards] == [7, 7, 7]
    assert shards[0] == pieces[0] and shards[1] == pieces[1] and shards[2][:6] == pieces[2]
    assert shards[2][6] == laid_out[0]  # padding: the first item again, as DistributedSampler pads


def test_indexed_cat_drops_sampler_padding():
    metric = IndexedCat(["value"])
    metric.update(torch.tensor([3, 1]), value=torch.tensor([[30.0], [10.0]]))
    metric.update(torch.tensor([2, 3]), value=torch.tensor([[20.0], [30.0]]))  # 3 again: padding
    result = metric.compute()
    assert result["index"].tolist() == [1, 2, 3] and result["value"].squeeze(1).tolist() == [10.0, 20.0, 30.0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pixel re-ID trained on a 16-patient × 2-video phantom at 32 px; τ calibrated after the last epoch."""
    from datamodules.phantom import generate_phantom

    out = tmp_path_factory.mktemp("reid")
    root = generate_phantom(out / "data", patients=16, videos_per_patient=2, seed=7, size=32, frames=(16, 24))
    L.seed_everything(0)
    dm = EchoNetDataModule(root, sampling="frames", num_frames=3, batch_size=8, group_by_patient=True)
    epochs = 15
    module = ReIDModule(in_channels=1, layers=[1, 1], block="basic", width=16, stem="small", lr=3e-3,
                        lr_schedule="constant", calibrate_every_n_epochs=epochs)
    checkpoint = Checkpoint(dirpath=out / "checkpoints", save_last=True, monitor="val/auc", mode="max")
    logger = L.pytorch.loggers.CSVLogger(out, name="log")
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=logger, callbacks=[checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    return module, dm, out / "checkpoints", rows


def test_reid_learns_identity_and_stores_tau(trained):
    module, dm, out, rows = trained
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [r for r in rows if r.get("val/auc")]
    assert np.mean(losses[-6:]) < 0.85 * np.mean(losses[:6])
    assert float(val[-1]["val/loss"]) < float(val[0]["val/loss"]) - 0.1
    assert float(val[-1]["val/auc"]) >= 0.95 and float(val[-1]["val/auc_cross_video"]) >= 0.9
    assert "val/tau" in val[-1] and not val[0].get("val/tau")  # calibrated at the last epoch only
    assert module.calibrated and float(module.tau_quantile) == 0.95 and module.tau_protocol == "frames:3"

    # τ in the checkpoint and in the JSON beside it equal an independent recomputation from the two splits.
    info = json.loads((out / "last.tau.json").read_text())
    # last.ckpt is the last epoch even when val/auc did not improve there (Lightning ≥ 2.6 would keep the best).
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == info["epoch"] == len(val) - 1
    restored = load_reid(out / "last.ckpt")
    assert not restored.training and restored.calibrated
    assert float(restored.tau) == pytest.approx(info["tau"]) and info["quantile"] == 0.95
    assert restored.tau_protocol == info["protocol"] == "frames:3"  # the DataModule's num_frames: 3
    assert info["weights_checksum"] == restored.weights_checksum()
    heldout, bank = embed_split(restored, dm, "val"), embed_split(restored, dm, "train")
    best = brute_force_video_best(restored, heldout.embedding, bank.embedding)
    assert info["tau"] == pytest.approx(float(np.quantile(best, 0.95)), abs=1e-5)


def brute_force_video_best(module, queries, bank):
    flat = bank.reshape(-1, bank.shape[-1])
    return [max(float(module.head((q[None] - flat).abs()).max()) for q in frames) for frames in queries]


def test_embedding_cache_is_keyed_by_weights(trained, tmp_path, monkeypatch):
    module, dm, _, _ = trained
    first = embed_split(module, dm, "val", cache_dir=tmp_path)
    files = list(tmp_path.glob("reid-val-*.safetensors"))
    assert len(files) == 1

    def no_loading(*args, **kwargs):
        raise AssertionError("the cache should have been read")

    with monkeypatch.context() as patch:
        patch.setattr(dm, "eval_dataloader", no_loading)
        again = embed_split(module, dm, "val", cache_dir=tmp_path)
    torch.testing.assert_close(again.embedding, first.embedding)
    assert again.index.tolist() == sorted(again.index.tolist()) == list(range(len(dm.datasets["val"])))

    other = copy.deepcopy(module)
    with torch.no_grad():
        other.head.weight.mul_(2)
    embed_split(other, dm, "val", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("reid-val-*.safetensors"))) == 2


def test_ddp_validation_equals_one_process(trained, tmp_path):
    """`echo-lvdm validate` with 2 CPU processes gives the AUC and τ of 1 process (padding de-duplicated, shards
    gathered on every rank)."""
    _, dm, out, _ = trained
    checkpoint = tmp_path / "reid.ckpt"  # as `echo-lvdm fit` writes it: LightningCLI records the class path
    state = torch.load(out / "last.ckpt", weights_only=True)
    state["hyper_parameters"]["_class_path"] = "lightning_modules.reid.ReIDModule"
    torch.save(state, checkpoint)
    results = {}
    for devices in (1, 2):
        log_dir = tmp_path / f"devices{devices}"
        command = [str(Path(sys.executable).with_name("echo-lvdm")), "validate",
                   "--config", str(REPO / "configs/reid_pixel.yaml"),
                   "--config", str(REPO / "configs/reid_pixel_quickstart.yaml"), "--data.root", str(dm.roots["val"]),
                   "--data.size", "32", "--data.num_frames", "3", "--data.batch_size", "3", "--data.num_workers", "0",
                   "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy",
                   "ddp" if devices > 1 else "auto", "--trainer.enable_progress_bar", "false",
                   "--trainer.default_root_dir", str(log_dir), "--trainer.logger.init_args.save_dir", str(log_dir),
                   "--ckpt_path", str(checkpoint)]
        result = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = list(csv.DictReader(open(next(log_dir.rglob("metrics.csv")))))
        results[devices] = {key: float(value) for key, value in rows[-1].items() if key.startswith("val/") and value}
    assert set(results[1]) >= {"val/auc", "val/auc_same_video", "val/auc_cross_video", "val/tau", "val/loss"}
    assert results[1] == pytest.approx(results[2], abs=1e-5)
