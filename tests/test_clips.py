"""Clip planning: which source frames a clip takes, and the documented padding rules, against hand-written oracles."""

import numpy as np
import pytest

from datamodules.clips import clip_indices, clip_span, frame_sample_indices, max_clip_start


def test_contiguous_clip_with_period():
    assert clip_indices(40, 4, 2.0, start=5).tolist() == [5, 7, 9, 11]
    assert clip_span(4, 2.0) == 7
    assert max_clip_start(40, 4, 2.0) == 33


def test_fractional_step_resamples_50_to_32_fps():
    # 50 fps → 32 fps: one returned frame every 1.5625 source frames, rounded to the nearest frame.
    assert clip_indices(100, 5, 50 / 32, start=0).tolist() == [0, 2, 3, 5, 6]


@pytest.mark.parametrize(
    ("pad", "expected"),
    [
        ("reflect", [0, 1, 2, 3, 2, 1, 0, 1, 2]),
        ("loop", [0, 1, 2, 3, 0, 1, 2, 3, 0]),
        ("last", [0, 1, 2, 3, 3, 3, 3, 3, 3]),
        ("zeros", [0, 1, 2, 3, -1, -1, -1, -1, -1]),
    ],
)
def test_padding_rules_for_a_video_shorter_than_the_clip(pad, expected):
    assert max_clip_start(4, 9, 1.0) == 0
    assert clip_indices(4, 9, 1.0, start=0, pad=pad).tolist() == expected


def test_single_frame_video_reflects_to_itself():
    assert clip_indices(1, 5, 1.0, start=0, pad="reflect").tolist() == [0] * 5


def test_frame_sampling_is_distinct_and_ordered():
    rng = np.random.default_rng(0)
    for _ in range(50):
        picked = frame_sample_indices(30, 6, rng)
        assert len(set(picked.tolist())) == 6 and np.all(np.diff(picked) > 0) and picked.max() < 30
    assert frame_sample_indices(2, 4, rng).tolist() in ([0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0],
                                                        [1, 1, 1, 1])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="pad must be one of"):
        clip_indices(4, 8, 1.0, 0, pad="mirror")
    with pytest.raises(ValueError, match="step > 0"):
        clip_indices(4, 8, 0.0, 0)
