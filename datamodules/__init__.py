"""Data side of echo-lvdm: EchoNet-layout datasets, the shared DataModule, video I/O and the echo phantom.

The bottom of the one-way import order (datamodules ← lightning_modules ← callbacks ← echo_lvdm): nothing here
imports the rest of the project.
"""

from datamodules.datamodule import EchoNetDataModule
from datamodules.dataset import EchoNetVideoDataset, to_model_range
from datamodules.filelist import DataValidationError
from datamodules.latents import EchoNetLatentDataset
from datamodules.phantom import generate_phantom
from datamodules.requests import GenerationRequests
from datamodules.video_io import VideoInfo, VideoReadError, atomic_output, probe_video, read_video, write_video

__all__ = ["DataValidationError", "EchoNetDataModule", "EchoNetLatentDataset", "EchoNetVideoDataset",
           "GenerationRequests", "VideoInfo", "VideoReadError", "atomic_output", "generate_phantom", "probe_video",
           "read_video", "to_model_range", "write_video"]
