"""Ingestion under faults: unreadable files fail it (never cached as complete), one malformed line
is one counted skip, record-supplied paths stay inside their image folder."""
import builtins
import json
import logging
import os

import pytest

from emu2_jax.data import paths
from emu2_jax.data import sources as src

from .conftest import GOOD, jpeg_bytes, write_jsonl, write_tar


def _shards(tmp_path):
    return [write_tar(tmp_path / f"s-{i}.tar", [(f"k{i}.jpg", GOOD), (f"k{i}.txt", b"cap %d" % i)])
            for i in range(2)]


def _deny(monkeypatch, denied: str):
    """Tests run as root, where chmod 000 still reads: refuse the open instead."""
    real_open = builtins.open

    def open_(file, *args, **kwargs):
        if os.fspath(file) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", open_)


def test_unreadable_shard_fails_ingestion_and_is_not_cached(tmp_path, monkeypatch):
    paths = _shards(tmp_path)
    cache = str(tmp_path / "cache")
    with monkeypatch.context() as m:
        _deny(m, paths[1])
        with pytest.raises(OSError, match=r"cannot read input file .*s-1\.tar: Permission denied"):
            src.prepare_source("pairs", "webdataset", paths=",".join(paths), data_dir=cache)
    prepared = src.prepare_source("pairs", "webdataset", paths=",".join(paths), data_dir=cache)
    assert len(prepared.data_source) == 2 and prepared.ingest_skips == {}


def test_unreadable_image_fails_ingestion(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(GOOD)
    path = write_jsonl(tmp_path / "e.jsonl", [{"source": "a.jpg", "target": "a.jpg",
                                               "instruction": "x"}])
    _deny(monkeypatch, str(tmp_path / "a.jpg"))
    with pytest.raises(OSError, match=r"cannot read input file .*a\.jpg"):
        src.prepare_source("edits", "jsonl", paths=path, data_dir=str(tmp_path / "cache"))


def test_cache_key_covers_the_file_set_and_the_code_version(tmp_path, monkeypatch):
    paths = _shards(tmp_path)
    cache = tmp_path / "cache"
    src.prepare_source("pairs", "webdataset", paths=",".join(paths), data_dir=str(cache))
    src.prepare_source("pairs", "webdataset", paths=",".join(reversed(paths)), data_dir=str(cache))
    assert len(list((cache / "emu2_pairs").iterdir())) == 1  # same set, other order: same entry
    monkeypatch.setattr(src, "CODE_DIGEST", "a changed reader")
    src.prepare_source("pairs", "webdataset", paths=",".join(paths), data_dir=str(cache))
    assert len(list((cache / "emu2_pairs").iterdir())) == 2


def test_cached_dataset_reports_its_ingest_skips(tmp_path, caplog):
    path = write_tar(tmp_path / "p.tar", [("a.jpg", GOOD), ("a.txt", b"x"), ("b.jpg", GOOD)])
    for _ in range(2):
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            prepared = src.prepare_source("pairs", "webdataset", paths=path,
                                          data_dir=str(tmp_path / "cache"))
        assert prepared.ingest_skips == {"bad_record": 1}
        assert "bad_record" in caplog.text and "p.tar" in caplog.text


def test_one_bad_line_is_one_skip(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    (images / "one.jpg").write_bytes(GOOD)

    def doc(index, text_list=("A.", "B.")):
        return {"text_list": list(text_list),
                "image_info": [{"image_name": "one.jpg", "matched_text_index": index}]}
    lines = [
        json.dumps(doc(0)).replace('"matched_text_index": 0', '"matched_text_index": 1e400'),
        json.dumps(doc(10 ** 13)),
        b"[" * 100_000 + b"]" * 100_000,   # RecursionError in the json parser
        json.dumps(doc(True)),
        json.dumps(doc(1, ["A.", None])),  # image matched to a non-text item
        json.dumps({"text_list": "not a list"}),
        json.dumps(doc(3, ["A.", None, 7, "B."])),  # kept: non-strings dropped, index renumbered
    ]
    path = write_jsonl(tmp_path / "docs.jsonl", [x if isinstance(x, bytes) else x.encode()
                                                 for x in lines])
    with caplog.at_level(logging.WARNING):
        prepared = src.prepare_source("interleaved", "mmc4", paths=path, image_dir=str(images),
                                      data_dir=str(tmp_path / "cache"))
    (record,) = [prepared.data_source[i] for i in range(len(prepared.data_source))]
    assert record["sentences"] == [b"A.", b"B."] and list(record["image_sentence"]) == [1]
    assert prepared.ingest_skips == {"bad_record": 6}
    assert f"{path}:1" in caplog.text and f"{path}:2" in caplog.text
    assert f"{path}:3" in caplog.text and f"{path}:4" not in caplog.text  # the first 3 logged

    text = write_jsonl(tmp_path / "t.jsonl", [b"[" * 100_000, {"text": "ok"}, {"text": 5}])
    prepared = src.prepare_source("text", "jsonl", paths=text, data_dir=str(tmp_path / "cache"))
    assert len(prepared.data_source) == 1 and prepared.ingest_skips == {"bad_record": 2}

    grit = write_tar(tmp_path / "g.tar", [
        ("x.jpg", GOOD), ("x.json", json.dumps({"caption": "a", "noun_chunks": [
            [0, 1, 0, 0, 1, 1, 1]]}).encode()),
        ("y.jpg", GOOD), ("y.json", b'{"caption": "a", "noun_chunks": [[0, 1e400, 0, 0, 1, 1, 1]]}'),
        ("z.jpg", GOOD), ("z.json", b'{"caption": 3}')])
    prepared = src.prepare_source("grounded", "grit", paths=grit, data_dir=str(tmp_path / "cache"))
    assert len(prepared.data_source) == 1 and prepared.ingest_skips == {"bad_record": 2}


def test_input_directories(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no input files in {empty}"):
        paths.expand_paths(str(empty))
    full = tmp_path / "full"
    full.mkdir()
    for name in ("b.tar", "a.tar", ".hidden"):
        (full / name).write_bytes(b"")
    assert paths.expand_paths(str(full)) == [str(full / "a.tar"), str(full / "b.tar")]

    def denied(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(os, "listdir", denied)  # tests run as root: chmod would not stop a read
    with pytest.raises(PermissionError, match=f"cannot read input directory {full}: permission"):
        paths.expand_paths(str(full))


def test_record_paths_stay_inside_their_folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "one.jpg").write_bytes(GOOD)
    (images / "sub" / "two.jpg").write_bytes(GOOD)
    secret = jpeg_bytes((1, 2, 3))
    (tmp_path / "secret.jpg").write_bytes(secret)
    os.symlink(tmp_path / "secret.jpg", images / "out.jpg")
    os.symlink(tmp_path, images / "up")
    os.symlink(images / "one.jpg", images / "inside.jpg")
    unsafe = [str(tmp_path / "secret.jpg"), "/etc/hostname", "../secret.jpg",
              "sub/../../secret.jpg", "out.jpg", "up/secret.jpg"]
    safe = ["one.jpg", "sub/two.jpg", "sub/../one.jpg", "inside.jpg"]
    docs = [{"text_list": ["t"], "image_info": [{"image_name": "one.jpg", "matched_text_index": 0},
                                                 {"image_name": n, "matched_text_index": 0}]}
            for n in unsafe + safe]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    prepared = src.prepare_source("interleaved", "mmc4", paths=path, image_dir=str(images),
                                  data_dir=str(tmp_path / "cache"))
    ds = prepared.data_source
    assert prepared.ingest_skips == {"unsafe_path": len(unsafe)}
    assert sorted(len(ds[i]["images"]) for i in range(len(ds))) == [1] * 6 + [2] * 4
    assert all(secret not in ds[i]["images"] for i in range(len(ds)))

    # Without image_dir, names resolve against the shard's folder, never the working directory.
    llava = tmp_path / "llava.jsonl"
    turn = [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]
    write_jsonl(llava, [{"image": n, "conversations": turn}
                        for n in ("secret.jpg", "/etc/hostname", "../etc/passwd")])
    prepared = src.prepare_source("chat", "llava", paths=str(llava), data_dir=str(tmp_path / "c2"))
    assert len(prepared.data_source) == 1 and prepared.ingest_skips == {"unsafe_path": 2}
    edits = write_jsonl(tmp_path / "e.jsonl", [
        {"source": "one.jpg", "target": "../secret.jpg", "instruction": "x"},
        {"source": "one.jpg", "target": "sub/two.jpg", "instruction": "y"}])
    prepared = src.prepare_source("edits", "jsonl", paths=edits, image_dir=str(images),
                                  data_dir=str(tmp_path / "c3"))
    assert len(prepared.data_source) == 1 and prepared.ingest_skips == {"unsafe_path": 1}
