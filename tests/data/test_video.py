"""Video files at ingestion: PyAV decoding and frame sampling of short clips made here, WebVid-style
webdataset shards of mp4/webm clips, and YT-Storyboard interleaved videos."""
import json

import numpy as np
import pytest

from emu2_jax.data import images as im
from emu2_jax.data import sequences as sq
from emu2_jax.data import sources as src
from emu2_jax.data import tokenizer as tk
from emu2_jax.data import video
from emu2_jax.data.assembly import Context
from emu2_jax.data.skips import SkipExample

from .conftest import GOOD, TRUNCATED, clip_bytes, jpeg_bytes, write_jsonl, write_tar

pytest.importorskip("av")  # the `video` extra (in `test`): clips are written and read with it


FRAME = tk.IMG + tk.IMAGE * 2 + tk.IMG_END  # a frame's tokens with n_query=2


def _clip(num_frames: int, container: str = "mp4") -> bytes:
    return clip_bytes(num_frames, f".{container}")


def _levels(frames) -> list[int]:
    return [round(float(f.mean()) / 20) for f in frames]


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_uniform_sampling_with_stride(container):
    data = _clip(10, container)
    frames = video.read_video_bytes(data, 5)
    assert frames[0].shape == (24, 32, 3) and frames[0].dtype == np.uint8
    assert _levels(frames) == [1, 3, 5, 7, 9]  # centres of 5 segments of 10 frames
    # stride 2: frames 0, 2, 4, 6, 8, of which the centres of 4 segments
    assert _levels(video.read_video_bytes(data, 4, stride=2)) == [0, 2, 6, 8]
    assert _levels(video.read_video_bytes(data, 10)) == list(range(10))


def test_unreadable_short_and_huge_clips_are_skips(monkeypatch):
    data = _clip(6)
    with pytest.raises(SkipExample, match="too_short: 6 frames, stride 2, want 4"):
        video.read_video_bytes(data, 4, stride=2)
    for bad in (b"", b"not a video at all" * 20, data[: len(data) // 3], data[:-200]):
        with pytest.raises(SkipExample) as e:
            video.read_video_bytes(bad, 2)
        assert e.value.reason == "bad_video"
    with pytest.raises(SkipExample, match="too_short: 1 frames"):  # FFmpeg reads a JPEG as 1 frame
        video.read_video_bytes(GOOD, 2)
    with pytest.raises(ValueError, match="num_frames >= 1"):
        video.read_video_bytes(data, 0)
    monkeypatch.setattr(im, "MAX_PIXELS", 24 * 32 - 1)
    with pytest.raises(SkipExample, match="bad_video: 32x24 is too large"):
        video.read_video_bytes(data, 2)


def test_webvid_shards(tmp_path):
    path = write_tar(tmp_path / "webvid-000.tar", [
        ("a.mp4", _clip(12)), ("a.txt", b"a fading clip"),
        ("b.webm", _clip(9, "webm")), ("b.json", json.dumps({"caption": "from json"}).encode()),
        ("c.mp4", _clip(3)), ("c.txt", b"too short"),
        ("d.mp4", b"garbage bytes"), ("d.txt", b"unreadable"),
        ("e.000.jpg", jpeg_bytes((0, 0, 0))), ("e.001.jpg", jpeg_bytes((90, 90, 90))),
        ("e.txt", b"pre-extracted frames"),
        ("f.mp4", _clip(8)),  # no caption
    ])
    prepared = src.prepare_source("videos", "webdataset", paths=path, clip_frames=4, clip_stride=2,
                                  data_dir=str(tmp_path / "cache"))
    ds = prepared.data_source
    records = {bytes(ds[i]["caption"]): ds[i] for i in range(len(ds))}
    assert sorted(records) == [b"a fading clip", b"from json", b"pre-extracted frames"]
    levels = {c: _levels(im.decode_image(f) for f in r["frames"]) for c, r in records.items()}
    assert levels[b"a fading clip"] == [0, 4, 6, 10]   # of frames 0, 2, ..., 10
    assert levels[b"from json"] == [0, 2, 6, 8]        # of frames 0, 2, ..., 8
    assert len(records[b"pre-extracted frames"]["frames"]) == 2  # kept as they are
    assert prepared.ingest_skips == {"too_short": 1, "bad_video": 1, "bad_record": 1}


def test_image_size_fits_clip_frames_once_and_pre_extracted_frames_as_images(tmp_path, monkeypatch):
    """With --image_size the frames a clip decodes to are brought down before their one JPEG
    encoding (never decoded again: no second pass through fit_for_storage); pre-extracted frames
    go through fit_for_storage like any image, a truncated one a counted bad_image skip."""
    path = write_tar(tmp_path / "webvid-000.tar", [
        ("a.mp4", clip_bytes(6, size=(24, 40))), ("a.txt", b"clip"),
        ("e.000.jpg", jpeg_bytes(size=(40, 30))), ("e.001.jpg", jpeg_bytes(size=(40, 30))), ("e.txt", b"jpgs"),
        ("t.000.jpg", jpeg_bytes()), ("t.001.jpg", TRUNCATED), ("t.txt", b"cut")])
    fitted = []
    real_fit = im.fit_for_storage
    monkeypatch.setattr(im, "fit_for_storage", lambda data, size: fitted.append(data) or real_fit(data, size))
    prepared = src.prepare_source("videos", "webdataset", paths=path, clip_frames=3, image_size=12,
                                  data_dir=str(tmp_path / "cache"))
    ds = prepared.data_source
    records = {bytes(ds[i]["caption"]): ds[i]["frames"] for i in range(len(ds))}
    assert sorted(records) == [b"clip", b"jpgs"] and prepared.ingest_skips == {"bad_image": 1}
    assert [im.decode_image(f).shape for f in records[b"clip"]] == [(12, 20, 3)] * 3
    assert _levels(map(im.decode_image, records[b"clip"])) == list(im.sample_frame_indices(6, 3))  # frame i: grey 20 i
    assert [im.decode_image(f).shape for f in records[b"jpgs"]] == [(12, 16, 3)] * 2
    assert len(fitted) == 4  # the four JPEG frames; none of the clip's


def test_video_files_without_pyav_fail_ingestion_in_one_line(tmp_path, monkeypatch):
    path = write_tar(tmp_path / "v.tar", [("a.mp4", _clip(4)), ("a.txt", b"clip")])

    def no_pyav():
        raise ImportError("reading video files needs PyAV: pip install -e '.[video]'")
    monkeypatch.setattr(video, "_pyav", no_pyav)
    with pytest.raises(ImportError, match=r"needs PyAV"):  # never counted as bad records
        src.prepare_source("videos", "webdataset", paths=path, data_dir=str(tmp_path / "cache"))


def test_storyboard_interleaves_frames_and_subtitles_by_time(tmp_path, tok):
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in ("v0.jpg", "v1.jpg", "v2.jpg"):
        (frames / name).write_bytes(GOOD)
    path = write_jsonl(tmp_path / "storyboards.jsonl", [
        {"video_id": "x", "frames": [{"image": "v1.jpg", "time": 5.0}, {"image": "v0.jpg", "time": 0},
                                     {"image": "gone.jpg", "time": 7}],
         "subtitles": [{"text": "Later on.", "start": 6.0, "end": 8}, {"text": "Hello.", "start": 0.0},
                       {"text": "Same time as v1.", "start": 5.0}]},
        {"video_id": "y", "frames": [{"image": "v2.jpg", "time": "nan"}], "subtitles": []},
        {"video_id": "z", "frames": [{"image": "gone.jpg", "time": 1}]},
        {"video_id": "w", "frames": [{"image": "../v0.jpg", "time": 1}, {"image": "v2.jpg", "time": 2}],
         "subtitles": [{"text": 5, "start": 1}]},
    ])
    prepared = src.prepare_source("interleaved", "storyboard", paths=path, image_dir=str(frames),
                                  data_dir=str(tmp_path / "cache"))
    (record,) = [prepared.data_source[i] for i in range(len(prepared.data_source))]
    # the missing frame's slot stays, empty (rows skip empty sentences)
    assert record["sentences"] == [b"", b"Hello.", b"", b"Same time as v1.", b"Later on.", b""]
    assert list(record["image_sentence"]) == [0, 2] and len(record["images"]) == 2
    assert prepared.ingest_skips == {"missing_file": 2, "no_images": 1, "bad_record": 2}

    # In a stage-2 row the frames sit where their timestamps put them, whichever side of its
    # sentence the pipeline draws an image on.
    ctx = Context(tok, n_query=2, v_query=2, max_len=256, max_images=8)
    sentences = [s.decode() for s in record["sentences"]]
    frames = [np.full((8, 8, 3), level, np.float32) for level in (0.1, 0.2)]
    rows = [sq.build_interleaved(ctx, sentences, frames, list(record["image_sentence"]),
                                 np.random.default_rng(0), max_images=8, max_len=256,
                                 image_first_prob=p, regress_images=False) for p in (0.0, 1.0)]
    assert rows[0].tokens.tolist() == rows[1].tokens.tolist() == tok.encode(
        f"{FRAME}Hello.{FRAME}Same time as v1. Later on.</s>")
