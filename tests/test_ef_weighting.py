"""EF-rarity loss weights: a table equal to a hand count, a training loss equal to the weighted mean of the per-video
losses, a table counted from the fit's training split and kept by its checkpoint, and clear errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.checkpoint import Checkpoint
from datamodules.datamodule import EchoNetDataModule
from lightning_modules.diffusion import VideoDiffusionModule
from lightning_modules.ef_weighting import ef_weight_table, ef_weights
from tests.helpers.data import encode_tiny_latents
from tests.helpers.models import TINY_DIFFUSION


def contract_batch(batch_size: int, frames: int, size: int = 8) -> dict[str, torch.Tensor]:
    """A latent batch of the shared contract with distinct EFs, 10–90 %."""
    generator = torch.Generator().manual_seed(0)
    return {"video": torch.randn(batch_size, frames, 4, size, size, generator=generator),
            "ef": torch.linspace(10.0, 90.0, batch_size), "fps": torch.full((batch_size,), 12.5),
            "index": torch.arange(batch_size), "patient": torch.arange(batch_size)}


@pytest.fixture(autouse=True)
def pinned_global_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")


def test_table_is_the_capped_inverse_frequency_with_mean_one():
    # 10 videos in 3 bins of 10 %: 1 at 20–30, 6 at 50–60, 3 at 80–90 (and 100 % falls in the last bin, 90–100).
    ef = [25.0] + [51.0, 52.0, 55.0, 55.5, 58.0, 59.9] + [80.0, 85.0, 89.0]
    table = ef_weight_table(ef, bin_width=10.0, cap=100.0)
    raw = {2: 10 / (3 * 1), 5: 10 / (3 * 6), 8: 10 / (3 * 3)}  # N / (K n_b): 1 everywhere for a uniform split
    scale = sum(raw[b] * n for b, n in ((2, 1), (5, 6), (8, 3))) / 10
    expected = torch.ones(10)
    for b, w in raw.items():
        expected[b] = w / scale
    torch.testing.assert_close(table, expected)
    weights = ef_weights(table, torch.tensor(ef), 10.0)
    assert weights.mean() == pytest.approx(1.0) and weights[0] > weights[7] > weights[1]
    # The cap clips the rarest bin before the mean is restored; a uniform split weighs 1 everywhere.
    capped = ef_weight_table(ef, bin_width=10.0, cap=2.0)
    assert capped[2] / capped[8] == pytest.approx(2.0 / raw[8]) and ef_weights(capped, torch.tensor(ef), 10.0).mean(
        ) == pytest.approx(1.0)
    torch.testing.assert_close(ef_weight_table([15.0, 45.0, 75.0], 10.0, 5.0), torch.ones(10))
    assert ef_weights(table, torch.tensor([100.0, -3.0]), 10.0).tolist() == [1.0, 1.0]  # clamped to the edge bins


def test_training_loss_is_the_weighted_mean_of_each_videos_loss():
    torch.manual_seed(0)
    plain = VideoDiffusionModule(**TINY_DIFFUSION)
    weighted = VideoDiffusionModule(**TINY_DIFFUSION, ef_loss_weight_cap=4.0, ef_loss_weight_bin=10.0)
    weighted.load_state_dict(plain.state_dict() | {"ef_weight_table": torch.linspace(0.5, 5.0, 10)})
    batch = contract_batch(6, 3)  # EFs 10–90 %
    # The training draws of a video depend on its index only, so each video's loss can be had on its own.
    alone = torch.stack([plain._shared_step({k: v[i:i + 1] for k, v in batch.items()}, "train") for i in range(6)])
    w = ef_weights(weighted.ef_weight_table, batch["ef"], 10.0)
    assert len(set(w.tolist())) == 6
    torch.testing.assert_close(weighted._shared_step(batch, "train"), (w * alone).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(plain._shared_step(batch, "train"), alone.mean(), rtol=1e-5, atol=1e-7)
    # Evaluation losses stay unweighted: val/loss compares models trained with and without weights.
    weighted._shared_step(batch, "val"), plain._shared_step(batch, "val")
    torch.testing.assert_close(weighted.val_losses.compute()["loss"], plain.val_losses.compute()["loss"])


@pytest.fixture(scope="module")
def latent_phantom(tmp_path_factory):
    from datamodules.phantom import generate_phantom

    root = generate_phantom(tmp_path_factory.mktemp("ef_weighting") / "data", patients=8, videos_per_patient=1,
                            seed=3, size=32, frames=(16, 20))
    return root, encode_tiny_latents(root, root.parent / "latents")


def datamodule(latent_phantom, **overrides) -> EchoNetDataModule:
    root, cache = latent_phantom
    return EchoNetDataModule(root, **dict(space="latent", latent_dir=str(cache), latent_posterior="mean",
                                          clip_length=4, period=2, batch_size=2, seed=0) | overrides)


def trainer(root, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=root, num_sanity_val_steps=0, limit_val_batches=0, **kwargs)


def test_fit_counts_the_training_split_and_a_resumed_run_keeps_the_table(latent_phantom, tmp_path):
    options = dict(**TINY_DIFFUSION, ema_decay=None, ef_loss_weight_cap=3.0, ef_loss_weight_bin=25.0)
    torch.manual_seed(0)
    module = VideoDiffusionModule(**options)
    data = datamodule(latent_phantom)
    trainer(tmp_path, max_epochs=1, callbacks=[Checkpoint(dirpath=tmp_path / "ckpt", save_last=True)]).fit(module, data)
    train_ef = [record.ef for record in data.datasets["train"].records]
    torch.testing.assert_close(module.ef_weight_table, ef_weight_table(train_ef, 25.0, 3.0))
    assert len(set(ef_weights(module.ef_weight_table, torch.tensor(train_ef), 25.0).tolist())) > 1  # it weighs
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(saved["state_dict"]["ef_weight_table"], module.ef_weight_table)

    # Resumed on a smaller training subset (other EFs), the run goes on with the table it started with.
    subset = datamodule(latent_phantom, train_videos=2)
    resumed = VideoDiffusionModule(**options)
    trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(resumed, subset,
                                                                   ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    torch.testing.assert_close(resumed.ef_weight_table, module.ef_weight_table)
    fresh = VideoDiffusionModule(**options)
    trainer(tmp_path, max_epochs=1, enable_checkpointing=False).fit(fresh, datamodule(latent_phantom, train_videos=2))
    assert not torch.equal(fresh.ef_weight_table, module.ef_weight_table)


def test_bad_options_and_a_fit_without_the_datamodule_are_refused(latent_phantom, tmp_path):
    with pytest.raises(ValueError, match="ef_loss_weight_cap must be ≥ 1"):
        VideoDiffusionModule(**TINY_DIFFUSION, ef_loss_weight_cap=0.5)
    with pytest.raises(ValueError, match=r"ef_loss_weight_bin must be in \(0, 100\]"):
        VideoDiffusionModule(**TINY_DIFFUSION, ef_loss_weight_cap=2.0, ef_loss_weight_bin=0.0)
    module = VideoDiffusionModule(**TINY_DIFFUSION, ef_loss_weight_cap=2.0)
    with pytest.raises(RuntimeError, match="never counted"):
        module._shared_step(contract_batch(2, 3), "train")
    data = datamodule(latent_phantom)
    data.setup("fit")
    loader = DataLoader(data.datasets["train"], batch_size=2)
    with pytest.raises(RuntimeError, match="fit with an EchoNetDataModule"):
        trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, loader)
