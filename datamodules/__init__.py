"""Data side of echo-lvdm: EchoNet-layout datasets, the shared DataModule, video I/O and the echo phantom."""

from datamodules.video_io import VideoInfo, VideoReadError, probe_video, read_video, write_video

__all__ = ["VideoInfo", "VideoReadError", "probe_video", "read_video", "write_video"]
