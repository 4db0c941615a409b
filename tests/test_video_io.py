"""Clips in and out: GIF and frame folders (Pillow), MP4 / WebM (PyAV)."""
import numpy as np
import pytest
from PIL import Image

from emu2_jax import video_io


def test_gif_and_frame_folder_round_trip_and_errors(tmp_path):
    clip = (np.random.default_rng(0).random((3, 8, 10, 3)) * 255).astype(np.uint8)
    video_io.write_video(tmp_path / "c.gif", clip)
    back = video_io.read_video(tmp_path / "c.gif")
    assert len(back) == 3 and back[0].shape == (8, 10, 3)
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(clip):
        Image.fromarray(frame).save(tmp_path / "frames" / f"{i:03d}.png")
    np.testing.assert_array_equal(np.stack(video_io.read_video(tmp_path / "frames")), clip)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no frame"):
        video_io.read_video(tmp_path / "empty")
    with pytest.raises(ValueError, match="no such file"):
        video_io.read_video(tmp_path / "missing.gif")


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_encoded_video_round_trip(tmp_path, suffix):
    """A smooth clip survives lossy encoding closely; frame count, size and order are kept."""
    y, x = np.mgrid[0:32, 0:48]
    clip = np.stack([np.stack([(x * 5 + 20 * t) % 256, y * 7, np.full_like(x, 60 * t)], -1)
                     for t in range(4)]).astype(np.uint8)
    path = tmp_path / f"c{suffix}"
    video_io.write_video(path, clip, fps=12.5)
    back = np.stack(video_io.read_video(path))
    assert back.shape == clip.shape
    error = np.abs(back.astype(np.int32) - clip).mean(axis=(1, 2, 3))
    assert error.max() < 8, error  # crf 18 on a smooth clip
    other = [np.abs(back[i].astype(np.int32) - clip[(i + 1) % 4]).mean() for i in range(4)]
    assert min(other) > 2 * error.max()  # each frame is its own, not a neighbour's


def test_write_and_read_errors_name_the_file(tmp_path):
    clip = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"--out=.*x.avi: a clip is written as .gif or .mp4 or .webm"):
        video_io.check_writable(tmp_path / "x.avi", "--out")
    with pytest.raises(ValueError, match="needs even frame sides, got 7x8"):
        video_io.write_video(tmp_path / "odd.mp4", np.zeros((2, 8, 7, 3), np.uint8))
    with pytest.raises(ValueError, match=r"want uint8 \[F, H, W, 3\]"):
        video_io.write_video(tmp_path / "f.gif", clip.astype(np.float32))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match=r"--video=.*broken.mp4: not a readable video"):
        video_io.read_video(broken)
