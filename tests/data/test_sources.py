"""TFDS ingestion of the corpus formats (webdataset tars, MMC4 jsonl, GRIT, Pile jsonl, LLaVA json,
edit jsonl) and of the embedded dataset, all into tmp cache dirs."""
import json
import time

import numpy as np
import pytest

from emu2_jax.data import embedded, paths
from emu2_jax.data import images as im
from emu2_jax.data import sources as src

from .conftest import GARBAGE, GOOD, NOT_UTF8, TRUNCATED, jpeg_bytes, write_jsonl, write_tar

EMBEDDED_SIZES = {"pairs": 28, "videos": 8, "interleaved": 4, "grounded": 9, "text": 12, "chat": 8,
                  "edits": 8}


def test_embedded_dataset_builds_quickly_and_offline(tmp_path):
    start = time.time()
    prepared = {kind: src.prepare_source(kind, "embedded", data_dir=str(tmp_path))
                for kind in src.KINDS}
    assert time.time() - start < 30
    assert {k: len(p.data_source) for k, p in prepared.items()} == EMBEDDED_SIZES
    assert all(p.ingest_skips == {} for p in prepared.values())
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(".array_record" in f.name for f in files)
    start = time.time()  # second use reads the cache
    again = src.prepare_source("pairs", "embedded", data_dir=str(tmp_path))
    assert time.time() - start < 1 and len(again.data_source) == 28
    assert sum(f.stat().st_size for f in embedded.DIR.rglob("*") if f.is_file()) < 5e6
    videos = prepared["videos"].data_source
    record = next(videos[i] for i in range(len(videos)) if len(videos[i]["frames"]) == 16)
    frame = im.decode_image(record["frames"][0])
    assert frame.shape == (embedded.FRAME_SIZE, embedded.FRAME_SIZE, 3)
    chat = prepared["chat"].data_source
    records = [chat[i] for i in range(len(chat))]
    assert sum(r["grounding"] for r in records) == 1
    assert max(sum(r["video_lengths"]) for r in records) == 16
    grounded = prepared["grounded"].data_source
    boxes = np.concatenate([grounded[i]["boxes"] for i in range(len(grounded))])
    assert boxes.shape == (25, 4) and (boxes[:, :2] < boxes[:, 2:]).all()


def test_webdataset_pairs(tmp_path):
    shard0 = write_tar(tmp_path / "pairs-000.tar", [
        ("a.jpg", GOOD), ("a.txt", b"a red square"),
        ("b.png", jpeg_bytes(fmt="PNG")), ("b.json", json.dumps({"caption": "from json"}).encode()),
        ("c.jpg", GOOD),  # no caption: incomplete sample
        ("d.txt", b"caption without image"),
    ])
    write_tar(tmp_path / "pairs-001.tar", [
        ("e.jpg", TRUNCATED), ("e.txt", b"kept at ingest, dropped when decoded"),
        ("f.jpg", GOOD), ("f.txt", NOT_UTF8),
    ])
    prepared = src.prepare_source("pairs", "webdataset", paths=str(tmp_path / "pairs-{000..001}.tar"),
                                  data_dir=str(tmp_path / "cache"))
    ds = prepared.data_source
    captions = sorted(ds[i]["caption"] for i in range(len(ds)))
    assert captions == sorted([b"a red square", b"from json", b"kept at ingest, dropped when decoded",
                               NOT_UTF8])
    assert prepared.ingest_skips == {"bad_record": 2}
    assert shard0 in prepared.description
    record = next(ds[i] for i in range(len(ds)) if ds[i]["caption"] == b"a red square")
    assert record["image"] == GOOD


def test_path_patterns_and_missing_files(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"s-{i:02d}.tar", [(f"k{i}.jpg", GOOD), (f"k{i}.txt", b"x")])
    assert len(paths.expand_paths(str(tmp_path / "s-{00..02}.tar"))) == 3
    assert len(paths.expand_paths(f"{tmp_path}/s-00.tar,{tmp_path}/s-0[12].tar")) == 3
    with pytest.raises(FileNotFoundError, match="s-03.tar"):
        paths.expand_paths(str(tmp_path / "s-{00..07}.tar"))
    with pytest.raises(ValueError, match="no paths"):
        paths.expand_paths("")
    with pytest.raises(ValueError, match="cannot be read from format"):
        src.prepare_source("pairs", "mmc4", paths="x")


def test_source_without_usable_record_names_its_path(tmp_path):
    bad = write_tar(tmp_path / "empty.tar", [("a.jpg", GOOD), ("b.txt", b"orphan caption")])
    with pytest.raises(ValueError, match="empty.tar"):
        src.prepare_source("pairs", "webdataset", paths=bad, data_dir=str(tmp_path / "cache"))


def test_truncated_tar_keeps_earlier_samples(tmp_path):
    path = write_tar(tmp_path / "cut.tar", [(f"{k}.jpg", GOOD) if i % 2 == 0 else (f"{k}.txt", b"c")
                                            for k in "abcdef" for i in range(2)])
    with open(path, "r+b") as f:
        f.truncate(6000)  # inside the third sample's image (2560 bytes/sample)
    prepared = src.prepare_source("pairs", "webdataset", paths=path,
                                  data_dir=str(tmp_path / "cache"))
    assert len(prepared.data_source) == 2
    assert prepared.ingest_skips == {"bad_record": 1}


def test_webdataset_videos(tmp_path):
    frames = [(f"v.{i:03d}.jpg", jpeg_bytes((i * 20, 0, 0))) for i in range(5)]
    path = write_tar(tmp_path / "vid.tar", [*frames, ("v.txt", b"a clip"), ("w.txt", b"no frames")])
    prepared = src.prepare_source("videos", "webdataset", paths=path,
                                  data_dir=str(tmp_path / "cache"))
    (record,) = [prepared.data_source[i] for i in range(len(prepared.data_source))]
    assert [im.decode_image(f)[0, 0, 0] // 20 for f in record["frames"]] == [0, 1, 2, 3, 4]
    assert prepared.ingest_skips == {"bad_record": 1}


def test_mmc4_documents(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "one.jpg").write_bytes(GOOD)
    (images / "two.jpg").write_bytes(jpeg_bytes((0, 0, 255)))
    doc = {"url": "u", "text_list": ["First.", "Second.", "Third."],
           "image_info": [{"image_name": "one.jpg", "matched_text_index": 0},
                          {"image_name": "gone.jpg", "matched_text_index": 1},
                          {"image_name": "two.jpg", "matched_text_index": 2}]}
    path = write_jsonl(tmp_path / "docs.jsonl", [
        doc,
        {"text_list": ["Only text."], "image_info": [{"image_name": "gone.jpg",
                                                      "matched_text_index": 0}]},
        b'{"text_list": ["broken json"',
        b'{"text_list": ["' + NOT_UTF8 + b'"], "image_info": []}',
    ])
    prepared = src.prepare_source("interleaved", "mmc4", paths=path, image_dir=str(images),
                                  data_dir=str(tmp_path / "cache"))
    (record,) = [prepared.data_source[i] for i in range(len(prepared.data_source))]
    assert record["sentences"] == [b"First.", b"Second.", b"Third."]
    assert list(record["image_sentence"]) == [0, 2] and record["images"][0] == GOOD
    assert prepared.ingest_skips == {"missing_file": 2, "no_images": 1, "bad_record": 1,
                                     "bad_text": 1}


def test_grit_grounded(tmp_path):
    meta = {"caption": "a dog on grass", "noun_chunks": [[0, 5, 0.1, 0.2, 0.5, 0.9, 0.8],
                                                         [9, 14, 0.0, 0.5, 1.0, 1.0, 0.7]],
            "width": 40, "height": 30}
    path = write_tar(tmp_path / "grit.tar", [("x.jpg", GOOD), ("x.json", json.dumps(meta).encode()),
                                             ("y.jpg", GOOD), ("y.json", b"{not json")])
    prepared = src.prepare_source("grounded", "grit", paths=path, data_dir=str(tmp_path / "cache"))
    (record,) = [prepared.data_source[i] for i in range(len(prepared.data_source))]
    assert record["caption"] == b"a dog on grass"
    np.testing.assert_array_equal(record["spans"], [[0, 5], [9, 14]])
    np.testing.assert_allclose(record["boxes"], [[0.1, 0.2, 0.5, 0.9], [0, 0.5, 1, 1]], rtol=1e-6)
    assert prepared.ingest_skips == {"bad_record": 1}


def test_text_chat_and_edit_files(tmp_path):
    text = write_jsonl(tmp_path / "pile.jsonl", [{"text": "doc one"}, {"meta": 1}, {"text": "two"}])
    prepared = src.prepare_source("text", "jsonl", paths=text, data_dir=str(tmp_path / "cache"))
    assert sorted(prepared.data_source[i]["text"] for i in range(2)) == [b"doc one", b"two"]
    assert prepared.ingest_skips == {"bad_record": 1}

    images = tmp_path / "img"
    images.mkdir()
    (images / "a.jpg").write_bytes(GOOD)
    (images / "b.jpg").write_bytes(GARBAGE)
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([
        {"id": 1, "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": 2, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": 3, "image": "missing.jpg", "conversations": [
            {"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
        {"id": 4, "conversations": [{"from": "gpt", "value": "wrong order"},
                                    {"from": "human", "value": "x"}]},
    ]))
    prepared = src.prepare_source("chat", "llava", paths=str(llava), image_dir=str(images),
                                  system="academic", data_dir=str(tmp_path / "cache"))
    records = sorted((prepared.data_source[i] for i in range(len(prepared.data_source))),
                     key=lambda r: len(r["users"]))
    assert [r["users"] for r in records] == [[b"Hi"], [b"[<IMG_PLH>]\nWhat is it?", b"Sure?"]]
    assert records[1]["assistants"] == [b"Red.", b"Yes."] and records[1]["images"] == [GOOD]
    assert records[0]["system"] == b"academic" and not records[0]["grounding"]
    assert prepared.ingest_skips == {"missing_file": 1, "bad_record": 1}

    edits = write_jsonl(tmp_path / "edits.jsonl", [
        {"source": "a.jpg", "target": "b.jpg", "instruction": "make it blue"},
        {"source": "a.jpg", "target": "nope.jpg", "instruction": "x"}])
    prepared = src.prepare_source("edits", "jsonl", paths=edits, image_dir=str(images),
                                  data_dir=str(tmp_path / "cache"))
    (record,) = [prepared.data_source[i] for i in range(len(prepared.data_source))]
    assert record["source"] == GOOD and record["target"] == GARBAGE  # decoded (and dropped) later
    assert prepared.ingest_skips == {"missing_file": 1}


def test_embedded_helpers():
    pixels = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    frames = embedded.camera_motion_frames(pixels, "pan_right", 4, size=8)
    assert len(frames) == 4 and frames[0].shape == (8, 8, 3)
    assert not np.array_equal(frames[0], frames[-1])
    zoom = embedded.camera_motion_frames(pixels, "zoom_in", 3, size=8)
    assert not np.array_equal(zoom[0], zoom[-1])
    np.testing.assert_array_equal(embedded.apply_edit(pixels, "flip_horizontal"), pixels[:, ::-1])
    assert embedded.apply_edit(pixels, "rotate_90").shape == (30, 20, 3)
    gray = embedded.apply_edit(pixels, "grayscale")
    assert (gray[..., 0] == gray[..., 2]).all()
    with pytest.raises(ValueError):
        embedded.apply_edit(pixels, "sharpen")
