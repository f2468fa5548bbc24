"""Video files: round trips through the codecs we write, decoded frame counts, and atomic writes."""

import subprocess
import sys

import av
import numpy as np
import pytest

from datamodules.video_io import VideoReadError, probe_video, read_video, write_video
from tests.helpers.processes import kill_when


def smooth_video(num_frames=24, height=48, width=64, seed=0):
    """Moving blobs on a gradient: echo-like smooth content, where the lossy codecs should be near-lossless."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(num_frames):
        cy, cx = height / 2 + 8 * np.sin(t / 4), width / 2 + 10 * np.cos(t / 5)
        blob = 120 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 60.0)
        frames.append(40 + blob + 0.8 * x + rng.normal(0, 1.0, (height, width)))
    return np.clip(frames, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("name", "max_mae"), [("clip.avi", 1.5), ("clip.mp4", 2.0), ("clip.mkv", 0.0)])
def test_round_trip(tmp_path, name, max_mae):
    frames = smooth_video()
    path = write_video(tmp_path / name, frames, fps=37.5)
    info = probe_video(path)
    assert (info.num_frames, info.height, info.width) == (24, 48, 64)
    assert info.fps == pytest.approx(37.5)
    decoded = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    mae = np.abs(decoded.astype(float) - frames).mean()
    assert mae <= max_mae, f"{name}: mean abs error {mae:.2f} grey levels"


def test_rgb_round_trip_and_gray_read(tmp_path):
    rgb = np.stack([smooth_video(seed=1), smooth_video(seed=2), smooth_video(seed=3)], axis=-1)
    path = write_video(tmp_path / "rgb.avi", rgb, fps=50)
    decoded = read_video(path, gray=False)
    assert decoded.shape == rgb.shape
    assert np.abs(decoded.astype(float) - rgb).mean() < 3.0
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert np.abs(read_video(path).astype(float) - luma).mean() < 3.0


def test_selected_frames_in_any_order(tmp_path):
    frames = smooth_video()
    path = write_video(tmp_path / "clip.mkv", frames, fps=50)
    np.testing.assert_array_equal(read_video(path, indices=[5, 2, 2, 9]), frames[[5, 2, 2, 9]])
    with pytest.raises(VideoReadError, match=r"clip\.mkv: frame 30 requested but the video decodes to 24 frames"):
        read_video(path, indices=[30])


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(VideoReadError, match=r"nothing\.avi: video file not found"):
        read_video(tmp_path / "nothing.avi")
    # Fixed bytes: random ones are now and then probed by FFmpeg as an audio format (about 1 seed in 300).
    garbage = tmp_path / "garbage.avi"
    garbage.write_bytes(b"this is not a video\n" * 200)
    with pytest.raises(VideoReadError, match=r"garbage\.avi: cannot decode video"):
        probe_video(garbage)
    sound = tmp_path / "sound.wav"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        container.mux(stream.encode(None))
    with pytest.raises(VideoReadError, match=r"sound\.wav: no video stream in file"):
        probe_video(sound)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="even frame sizes"):
        write_video(tmp_path / "odd.mp4", smooth_video(height=47), fps=50)
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_video_under_the_final_name(tmp_path):
    target = tmp_path / "long.mp4"
    script = (
        "import numpy as np, sys\n"
        "from datamodules.video_io import write_video\n"
        "frames = np.random.default_rng(0).integers(0, 255, (4000, 128, 128), dtype=np.uint8)\n"
        f"write_video({str(target)!r}, frames, fps=50)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script])
    kill_when(writer, lambda: any(p.name.endswith(".tmp") and p.stat().st_size > 0 for p in tmp_path.iterdir()))
    assert not target.exists()
    assert not list(tmp_path.glob("*.mp4")), "a visible partial video was left"


@pytest.mark.parametrize("name", ["gray.avi", "gray.mp4", "gray.mkv", "rgb.avi", "rgb.mp4", "rgb.mkv"])
def test_fast_gray_path_equals_ffmpeg_gray_conversion(tmp_path, name):
    """Gray frames are read from the luma plane (full or limited range) instead of through swscale: same values."""
    import av

    from datamodules.video_io import frame_to_array

    frames = smooth_video(num_frames=4)
    if name.startswith("rgb"):
        frames = np.stack([frames, np.flip(frames, axis=2), 255 - frames], axis=-1)
    path = write_video(tmp_path / name, frames, fps=25)
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            np.testing.assert_array_equal(frame_to_array(frame, gray=True), frame.to_ndarray(format="gray"))
