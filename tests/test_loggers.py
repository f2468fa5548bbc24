"""Dashboards: configs/logger/{wandb,tensorboard,csv}.yaml stacked after a model config replace the default logger and
write under the run folder (a wandb run is named after it); a tiny VAE fit through the real CLI then leaves scalars, images and the resolved config in each of them
(wandb offline: no network, everything in the local run's transaction log), and the VideoLogger's mp4 reach wandb."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import textwrap
import threading
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from google.protobuf.message import DecodeError
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from callbacks.config_logging import WANDB_CONFIG_FILE
from callbacks.video_logging import VideoLogger
from datamodules.video_io import probe_video
from echo_lvdm.lightning_cli import EchoLVDMCLI
from echo_lvdm.main import main
from lightning_modules.diffusion import VideoDiffusionModule
from tests.helpers.cli import REPO, print_config
from tests.helpers.models import TINY_DIFFUSION
from tests.helpers.video import FPS, FRAMES, PIXELS, LatentClips

LOGGERS = {"wandb": "WandbLogger", "tensorboard": "TensorBoardLogger", "csv": "CSVLogger"}
SIZE, LOGGED_FRAMES = 32, 3  # the reconstruction picture: 2 rows (originals, reconstructions) × 3 frames of 32 px


def vae_fit_args(phantom: Path, logger: str) -> list[str]:
    """configs/vae.yaml + vae_quickstart.yaml + logger/<logger>.yaml, shrunk: 32 px, 2 training and 2 validation
    steps; logs go where the config says, logs/vae_quickstart under the working directory."""
    return ["fit", "--config", str(REPO / "configs/vae.yaml"), "--config", str(REPO / "configs/vae_quickstart.yaml"),
            "--config", str(REPO / f"configs/logger/{logger}.yaml"),
            "--data.root", str(phantom), "--data.size", str(SIZE), "--data.num_frames", "2", "--data.batch_size", "2",
            "--data.num_workers", "0", "--model.init_args.block_out_channels", "[32, 32]",
            "--model.init_args.norm_num_groups", "8", "--model.init_args.sample_size", str(SIZE),
            "--model.init_args.num_logged_frames", str(LOGGED_FRAMES), "--trainer.accelerator", "cpu",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
            "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# ------------------------------------------------------------------------------------------------- config stacking
def test_logger_configs_replace_the_logger_and_write_under_the_run_folder(capsys, tmp_path):
    model = ["--config", str(REPO / "configs/lvdm.yaml"), "--config", str(REPO / "configs/lvdm_quickstart.yaml")]
    for name, class_name in LOGGERS.items():
        config = ["--config", str(REPO / f"configs/logger/{name}.yaml")]
        resolved = print_config(capsys, *model, *config)
        assert resolved["trainer"]["logger"]["class_path"] == f"lightning.pytorch.loggers.{class_name}"
        args = [*model, *config, "--data.root", str(tmp_path), "--data.latent_dir", str(tmp_path),
                "--trainer.accelerator", "cpu"]
        cli = EchoLVDMCLI(args=args, run=False)
        logger = cli.trainer.logger
        assert type(logger).__name__ == class_name and Path(logger.save_dir) == Path("logs/lvdm_quickstart")
        run_name = cli.config.trainer.logger.init_args.name  # what the logger was built with
        assert run_name == ("lvdm_quickstart" if name == "wandb" else "")  # wandb: the run folder's name
    wandb = print_config(capsys, *model, "--config", str(REPO / "configs/logger/wandb.yaml"),
                         "--trainer.logger.init_args.name", "ablation_7")["trainer"]["logger"]["init_args"]
    assert (wandb["name"], wandb["project"], wandb["offline"], wandb["log_model"]) == (
        "ablation_7", "echo-lvdm", True, False)
    undone = print_config(capsys, *model, "--config", str(REPO / "configs/logger/wandb.yaml"),
                          "--config", str(REPO / "configs/logger/csv.yaml"))["trainer"]["logger"]
    assert undone["class_path"].endswith("CSVLogger") and "offline" not in undone["init_args"]


# ---------------------------------------------------------------------------------------------------------- wandb
class NetworkSpy:
    """Every socket connection this process opens (``inet``), and a fake wandb server that counts its visitors."""

    def __init__(self) -> None:
        self.connections: list[tuple] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.visits, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self.server.accept()[0].close()
                self.visits += 1
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()

    def outside_connections(self) -> list[tuple]:
        """Internet connections to anything but this machine (wandb's own service talks over loopback/unix)."""
        return [address for family, address in self.connections
                if family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost")]


@pytest.fixture
def network(monkeypatch, tmp_path) -> NetworkSpy:
    """wandb pointed at a fake server with a plausible API key (an online run would call it), its caches in tmp_path,
    and socket.connect of this process recorded. The wandb-core service is a child process: the fake server sees it."""
    spy = NetworkSpy()
    for key, value in {"WANDB_BASE_URL": spy.url, "WANDB_API_KEY": "0" * 40, "WANDB_SILENT": "true",
                       "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                       "WANDB_DATA_DIR": tmp_path / "wandb_data"}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must come from the config
    connect = socket.socket.connect

    def recording_connect(sock, address):
        spy.connections.append((sock.family, address))
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    yield spy
    spy.close()


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's transaction log (``run-<id>.wandb``, what `wandb sync` uploads): a LevelDB
    log — 7-byte file header, 32 KiB blocks of records (crc32, length, type) holding serialized ``Record`` protos."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"[:len(data)], f"{path}: not a wandb transaction log"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # too little room left in the block for a header: zero padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: the record is complete
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def by_type(records: list, kind: str) -> list:
    return [getattr(record, kind) for record in records if record.WhichOneof("record_type") == kind]


def history(records: list) -> list[dict]:
    return [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in row.item}
            for row in by_type(records, "history")]


def finished_run(save_dir: Path, timeout: float = 30.0) -> tuple[Path, list]:
    """The one offline run under ``save_dir`` and its records, once its log holds the exit record: ``finish()``
    returns before wandb's service has written the log out."""
    deadline = time.monotonic() + timeout
    while True:
        (run_dir,) = (save_dir / "wandb").glob("offline-run-*")
        with contextlib.suppress(DecodeError):  # caught mid-write
            records = wandb_records(run_dir)
            if by_type(records, "exit"):
                return run_dir, records
        assert time.monotonic() < deadline, f"{run_dir}: no exit record after {timeout} s"
        time.sleep(0.1)


def test_wandb_fit_is_offline_and_keeps_config_scalars_and_images(phantom_root, tmp_path, network, monkeypatch):
    import wandb

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "logs" / "vae_quickstart"
    assert main(vae_fit_args(phantom_root, "wandb")) == 0
    assert wandb.run is None, "main() must finish its wandb run"

    assert network.visits == 0 and network.outside_connections() == [], network.connections
    run_dir, records = finished_run(out)
    (run,) = by_type(records, "run")
    assert (run.project, run.display_name) == ("echo-lvdm", "vae_quickstart")  # the run folder's name

    # The resolved config, as config.yaml in the log dir has it, is the run's config and a file of the run.
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    config = {item.key: json.loads(item.value_json) for record in by_type(records, "config") for item in record.update}
    assert config["model"] == resolved["model"] and config["data"] == resolved["data"]
    assert config["model"]["init_args"]["block_out_channels"] == [32, 32]
    assert config["trainer"]["logger"]["init_args"]["offline"] is True
    assert yaml.safe_load((run_dir / "files" / WANDB_CONFIG_FILE).read_text()) == resolved
    saved = [file.path for record in by_type(records, "files") for file in record.files]
    assert WANDB_CONFIG_FILE in saved

    rows = history(records)
    assert len([row for row in rows if "train/loss" in row]) == 2  # log_every_n_steps 1, 2 steps
    assert any(np.isfinite(row.get("val/psnr", np.nan)) for row in rows)
    (image_row,) = [row for row in rows if "val/reconstructions/filenames" in row]
    (image,) = image_row["val/reconstructions/filenames"]
    assert image in saved and image_row["trainer/global_step"] == 2
    assert np.asarray(Image.open(run_dir / "files" / image)).shape[:2] == (2 * SIZE, LOGGED_FRAMES * SIZE)

    # Checkpoints stay on disk, outside the run: no artifact, no checkpoint file in it.
    assert not by_type(records, "artifact") and not list(run_dir.rglob("*.ckpt"))
    assert list((out / "echo-lvdm" / run.run_id / "checkpoints").glob("*.ckpt"))


def fit_video_logger(root: Path, logger, vae: Path) -> L.Trainer:
    """One training step of the tiny diffusion model of test_video_logging, the VideoLogger sampling at validation."""
    torch.manual_seed(0)
    callback = VideoLogger(str(vae), ef_values=(25.0, 75.0), steps=2)
    trainer = L.Trainer(accelerator="cpu", logger=logger, max_epochs=1, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, num_sanity_val_steps=0, default_root_dir=root)
    trainer.fit(VideoDiffusionModule(**{**TINY_DIFFUSION, "lr": 1e-2}), LatentClips())
    return trainer


def test_wandb_run_gets_the_video_logger_mp4(vae_folder, tmp_path, network):  # noqa: F811 (fixture)
    logger = WandbLogger(save_dir=str(tmp_path), project="echo-lvdm", offline=True, log_model=False)
    try:
        fit_video_logger(tmp_path, logger, vae_folder)
    finally:
        logger.experiment.finish()
    assert network.visits == 0 and network.outside_connections() == [], network.connections
    run_dir, records = finished_run(tmp_path)
    rows = history(records)
    (videos,) = [row for row in rows if "val/samples/videos" in row]
    assert [video["caption"] for video in videos["val/samples/videos"]] == ["EF 25", "EF 75"]
    for video in videos["val/samples/videos"]:
        info = probe_video(run_dir / "files" / video["path"])
        assert video["path"].endswith(".mp4") and (info.num_frames, info.height, info.width, info.fps) == (
            FRAMES, PIXELS, PIXELS, FPS)
    assert any("val/sample_frames/filenames" in row for row in rows)


# ---------------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_fit_keeps_scalars_image_and_config_text(phantom_root, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    trainer = EchoLVDMCLI(args=vae_fit_args(phantom_root, "tensorboard")).trainer
    log_dir = Path("logs/vae_quickstart/version_0")  # the model config's run folder
    assert isinstance(trainer.logger, TensorBoardLogger) and Path(trainer.logger.log_dir) == log_dir
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()

    assert [event.step for event in events.Scalars("train/loss")] == [0, 1]
    for name in ("val/psnr", "val/loss"):
        (event,) = events.Scalars(name)
        assert event.value == pytest.approx(float(trainer.callback_metrics[name]), rel=1e-6)

    (image,) = events.Images("val/reconstructions")
    assert (image.step, image.height, image.width) == (2, 2 * SIZE, LOGGED_FRAMES * SIZE)

    (text,) = events.Tensors("config/text_summary")
    config_text = textwrap.dedent(text.tensor_proto.string_val[0].decode())
    resolved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert yaml.safe_load(config_text) == resolved
    assert resolved["model"]["init_args"]["sample_size"] == SIZE


def test_tensorboard_run_keeps_video_logger_files_and_picture(vae_folder, tmp_path):  # noqa: F811 (fixture)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = fit_video_logger(tmp_path, TensorBoardLogger(tmp_path, name="run"), vae_folder)
    log_dir = Path(trainer.logger.log_dir)
    assert sorted(path.name for path in (log_dir / "videos").iterdir()) == [
        "val_ef25_step00000001.mp4", "val_ef75_step00000001.mp4"]
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0}).Reload()
    (picture,) = events.Images("val/sample_frames")
    assert (picture.step, picture.height, picture.width) == (1, 2 * PIXELS, FRAMES * PIXELS)


# ------------------------------------------------------------------------------------------------------------- CSV
def test_csv_fit_writes_metrics_config_and_png(phantom_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(vae_fit_args(phantom_root, "csv")) == 0
    log_dir = tmp_path / "logs" / "vae_quickstart" / "version_0"
    header, *rows = (log_dir / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    assert {"train/loss", "val/psnr", "val/loss"} <= set(columns)
    losses = [row.split(",")[columns.index("train/loss")] for row in rows]
    assert len([loss for loss in losses if loss]) == 2
    resolved = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert resolved["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.CSVLogger"
    assert resolved["model"]["init_args"]["num_logged_frames"] == LOGGED_FRAMES
    picture = np.asarray(Image.open(log_dir / "images" / "val_reconstructions_step00000002.png"))
    assert picture.shape == (2 * SIZE, LOGGED_FRAMES * SIZE)
