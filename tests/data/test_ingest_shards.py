"""Ingestion shard by shard: Beam and this process give the same examples and skips, a failed run
resumes at the input files it had not finished, `python -m emu2_jax.data.prepare` as users run it,
local, file:// and gs:// (etils mock backend) paths."""
import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_data_source import ArrayRecordDataSource

from emu2_jax.data import images as im
from emu2_jax.data import ingest, paths
from emu2_jax.data import sources as src

from .conftest import GOOD, NOT_UTF8, REPO_ROOT, TRUNCATED, clip_bytes, jpeg_bytes, write_jsonl, write_tar


def _pairs_corpus(root) -> str:
    """Three tar shards with every bad webdataset sample kind; a pattern naming them."""
    write_tar(root / "p-0.tar", [
        ("a.jpg", GOOD), ("a.txt", b"a red square"),
        ("b.png", jpeg_bytes(fmt="PNG")), ("b.json", json.dumps({"caption": "from json"}).encode()),
        ("c.jpg", GOOD),                          # no caption
        ("d.txt", b"caption without image"),      # no image
        ("e.jpg", TRUNCATED), ("e.txt", b"kept at ingest, dropped when decoded"),
        ("f.jpg", GOOD), ("f.txt", NOT_UTF8)])
    cut = write_tar(root / "p-1.tar", [(f"{k}.jpg", GOOD) if i == 0 else (f"{k}.txt", k.encode())
                                       for k in "ghijkl" for i in range(2)])
    with open(cut, "r+b") as f:
        f.truncate(6000)                          # corrupt shard: 2 samples kept
    write_tar(root / "p-2.tar", [("m.jpg", GOOD), ("m.txt", b"m"), ("n.jpg", GOOD)])
    return str(root / "p-{0..2}.tar")


def _images(root) -> str:
    """An image folder with one.jpg, and a secret.jpg beside it that records must not reach."""
    images = root / "images"
    images.mkdir(exist_ok=True)
    (images / "one.jpg").write_bytes(GOOD)
    (root / "secret.jpg").write_bytes(GOOD)
    return str(images)


def _mmc4_corpus(root) -> str:
    def doc(*names, text=("A.", "B.")):
        return {"text_list": list(text),
                "image_info": [{"image_name": n, "matched_text_index": 0} for n in names]}
    write_jsonl(root / "d-0.jsonl", [
        doc("one.jpg"), doc("one.jpg", "gone.jpg"), doc("gone.jpg"), b'{"text_list": ["broken',
        b'{"text_list": ["' + NOT_UTF8 + b'"], "image_info": []}', b"[" * 100_000])
    write_jsonl(root / "d-1.jsonl", [
        doc("one.jpg", "../secret.jpg", "/etc/hostname"), {"text_list": "not a list"},
        doc("one.jpg", text=("C.",))])
    return f"{root}/d-0.jsonl,{root}/d-1.jsonl"


def _grit_corpus(root) -> str:
    def meta(chunks='[[0, 1, 0.1, 0.2, 0.5, 0.9, 0.8]]', caption='"a dog"'):
        return f'{{"caption": {caption}, "noun_chunks": {chunks}}}'.encode()
    write_tar(root / "g-0.tar", [("x.jpg", GOOD), ("x.json", meta()), ("y.jpg", GOOD),
                                 ("y.json", b"{not json")])
    write_tar(root / "g-1.tar", [("z.jpg", GOOD), ("z.json", meta("[[0, 1e400, 0, 0, 1, 1, 1]]")),
                                 ("w.jpg", GOOD), ("w.json", meta(caption="3")),
                                 ("v.jpg", GOOD), ("v.json", meta("[]"))])
    return str(root / "g-{0..1}.tar")


def _text_corpus(root) -> str:
    write_jsonl(root / "t-0.jsonl", [b"[" * 100_000, {"text": "ok"}, {"text": 5}])
    write_jsonl(root / "t-1.jsonl", [{"meta": 1}, {"text": "two"}, b'{"text": "' + NOT_UTF8 + b'"}'])
    return f"{root}/t-0.jsonl,{root}/t-1.jsonl"


def _llava_corpus(root) -> str:
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Red."}]
    (root / "l-0.json").write_text(json.dumps([
        {"image": "one.jpg", "conversations": turns},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"image": "missing.jpg", "conversations": turns},
        {"conversations": turns[::-1]}]))
    write_jsonl(root / "l-1.jsonl", [{"image": n, "conversations": turns}
                                     for n in ("../secret.jpg", "/etc/hostname", "one.jpg")])
    return f"{root}/l-0.json,{root}/l-1.jsonl"


def _edits_corpus(root) -> str:
    return write_jsonl(root / "e-0.jsonl", [
        {"source": "one.jpg", "target": "one.jpg", "instruction": "make it blue"},
        {"source": "one.jpg", "target": "nope.jpg", "instruction": "x"},
        {"source": "../secret.jpg", "target": "one.jpg", "instruction": "y"},
        {"source": "one.jpg", "target": "one.jpg", "instruction": 7}])


def _videos_corpus(root) -> str:
    write_tar(root / "v-0.tar", [("a.000.jpg", GOOD), ("a.001.jpg", GOOD), ("a.txt", b"frames"),
                                 ("b.mp4", clip_bytes(20, step=10)), ("b.txt", b"clip"),
                                 ("c.txt", b"no frames")])
    write_tar(root / "v-1.tar", [("d.mp4", clip_bytes(3)), ("d.txt", b"too short"),
                                 ("e.mp4", b"not a video"), ("e.txt", b"unreadable")])
    return str(root / "v-{0..1}.tar")


# kind, format, corpus, records kept, output shards (input files keeping a record), skips: every
# bad-record kind of test_sources.py and test_ingest_faults.py
CORPORA = {
    "pairs": ("pairs", "webdataset", _pairs_corpus, 7, 3, {"bad_record": 4}),
    "mmc4": ("interleaved", "mmc4", _mmc4_corpus, 4, 2, {
        "missing_file": 2, "no_images": 1, "bad_record": 3, "bad_text": 1, "unsafe_path": 2}),
    "grit": ("grounded", "grit", _grit_corpus, 2, 2, {"bad_record": 3}),
    "text": ("text", "jsonl", _text_corpus, 2, 2, {"bad_record": 3, "bad_text": 1}),
    "llava": ("chat", "llava", _llava_corpus, 3, 2, {"missing_file": 1, "bad_record": 1,
                                                  "unsafe_path": 2}),
    "edits": ("edits", "jsonl", _edits_corpus, 1, 1, {"missing_file": 1, "unsafe_path": 1,
                                                   "bad_record": 1}),
    "videos": ("videos", "webdataset", _videos_corpus, 2, 1, {"bad_record": 1, "too_short": 1,
                                                           "bad_video": 1}),
}


def _records(prepared) -> list[str]:
    """The examples as a sorted list (a multiset), every field included."""
    ds = prepared.data_source

    def plain(value):
        if isinstance(value, (bytes, str, bool, int, float)):
            return repr(value)
        if hasattr(value, "tolist"):
            return repr(value.tolist())
        return repr([plain(v) for v in value])
    return sorted(repr({k: plain(v) for k, v in sorted(ds[i].items())}) for i in range(len(ds)))


def _beam_config() -> tfds.download.DownloadConfig:
    runner, options = ingest.beam_settings("DirectRunner")  # in this process: fast to start
    return tfds.download.DownloadConfig(beam_runner=runner, beam_options=options)


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_beam_and_single_process_give_the_same_examples_and_skips(tmp_path, caplog, corpus):
    pytest.importorskip("apache_beam")
    if corpus == "videos":
        pytest.importorskip("av")
    kind, fmt, make, count, shards, skips = CORPORA[corpus]
    images = _images(tmp_path)
    inputs = make(tmp_path)
    single = src.prepare_source(kind, fmt, paths=inputs, image_dir=images,
                                data_dir=str(tmp_path / "single"))
    with caplog.at_level(logging.INFO, logger=ingest.__name__):
        beam = src.prepare_source(kind, fmt, paths=inputs, image_dir=f"file://{images}",
                                  data_dir=str(tmp_path / "beam"), download_config=_beam_config())
    assert _records(beam) == _records(single) and len(_records(single)) == count
    assert beam.ingest_skips == single.ingest_skips == skips
    # logging keeps a lone dict argument as the args themselves
    (counters,) = [r.args for r in caplog.records if r.msg.startswith("beam counters")]
    assert counters == {f"{kind}/{reason}": n for reason, n in skips.items()} | {
        f"{kind}/records": count}
    # one output shard per input file that kept records; the skips in the metadata either way
    for prepared in (single, beam):
        assert sum(".array_record-" in n for n in os.listdir(prepared.data_dir)) == shards
        with open(os.path.join(prepared.data_dir, "metadata.json")) as f:
            assert json.load(f) == {"ingest_skips": skips}


def test_failed_run_resumes_at_the_files_it_had_not_finished(tmp_path, monkeypatch):
    shards = [write_tar(tmp_path / f"s-{i}.tar", [m for j in range(3) for m in (
        (f"k{j}.jpg", GOOD), (f"k{j}.txt", b"cap %d %d" % (i, j)))]) for i in range(4)]
    real = src._READERS[("pairs", "webdataset")]
    read: list[str] = []

    def reader(fail_at: str):
        def read_one(cfg, skips):
            read.append(os.path.basename(cfg.paths[0]))
            if read[-1] == fail_at:
                raise OSError(f"cannot read input file {cfg.paths[0]}: network went away")
            yield from real(cfg, skips)
        return read_one
    cache = str(tmp_path / "cache")
    monkeypatch.setitem(src._READERS, ("pairs", "webdataset"), reader(fail_at="s-2.tar"))
    with pytest.raises(OSError, match=r"s-2\.tar: network went away"):
        src.prepare_source("pairs", "webdataset", paths=",".join(shards), data_dir=cache)
    (parts,) = list((tmp_path / "cache" / "emu2_pairs").glob("*/1.0.0.parts"))
    tasks = {os.path.basename(t.path): t for t in ingest.shard_tasks(
        "pairs", shards, str(parts), image_dir="", system="chat", clip_frames=16, clip_stride=1)}
    assert sorted(p.name for p in parts.iterdir()) == sorted(
        f"{tasks[s].part_name}.{ext}" for s in ("s-0.tar", "s-1.tar") for ext in ("array_record",
                                                                                  "json"))
    # A crash inside shard 3's writing and a marker whose shard went missing: neither is complete.
    (parts / f"{tasks['s-3.tar'].part_name}.array_record").write_bytes(b"half a shard")
    (parts / f"{tasks['s-1.tar'].part_name}.array_record").unlink()

    read.clear()
    monkeypatch.setitem(src._READERS, ("pairs", "webdataset"), reader(fail_at=""))
    prepared = src.prepare_source("pairs", "webdataset", paths=",".join(shards), data_dir=cache)
    assert read == ["s-1.tar", "s-2.tar", "s-3.tar"]  # s-0.tar was not read again
    captions = sorted(prepared.data_source[i]["caption"] for i in range(len(prepared.data_source)))
    assert captions == sorted(b"cap %d %d" % (i, j) for i in range(4) for j in range(3))
    assert not parts.exists()  # the staging folder goes once the dataset is complete

    # The same files in another order are the same dataset: what a failed run finished counts.
    cache = str(tmp_path / "cache2")
    monkeypatch.setitem(src._READERS, ("pairs", "webdataset"), reader(fail_at="s-1.tar"))
    with pytest.raises(OSError, match=r"s-1\.tar: network went away"):
        src.prepare_source("pairs", "webdataset", paths=",".join(shards), data_dir=cache)
    read.clear()
    monkeypatch.setitem(src._READERS, ("pairs", "webdataset"), reader(fail_at=""))
    prepared = src.prepare_source("pairs", "webdataset", paths=",".join(shards[::-1]),
                                  data_dir=cache)
    assert read == ["s-3.tar", "s-2.tar", "s-1.tar"]
    assert len(prepared.data_source) == 12


def _prepare(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emu2_jax.data.prepare", *flags],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def test_prepare_command(tmp_path):
    pattern = _pairs_corpus(tmp_path)
    done = _prepare("--kind=pairs", "--format=webdataset", f"--paths={pattern}",
                    f"--out={tmp_path / 'out'}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()[-3:]  # after TFDS's own "Downloading and preparing" lines
    assert lines[0].startswith("prepared 7 pairs records from ") and "runner none" in lines[0]
    assert lines[-1] == 'ingest_skips={"bad_record": 4}'
    assert lines[-2].startswith(f"dataset: {tmp_path / 'out'}/emu2_pairs/webdataset-")

    # file:// input and output URIs
    done = _prepare("--kind=pairs", "--format=webdataset", f"--paths=file://{pattern}",
                    f"--out=file://{tmp_path / 'uri'}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-2].startswith(f"dataset: {tmp_path / 'uri'}/emu2_pairs/")

    done = _prepare("--kind=pairs", "--format=webdataset", f"--paths={tmp_path}/nothing-*.tar")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"prepare: no file matches '{tmp_path}/nothing-*.tar'"]
    done = _prepare("--kind=pairs", "--format=mmc4", "--paths=x")
    assert "prepare: pairs records cannot be read from format 'mmc4'" in done.stderr


def test_prepare_command_on_beam_with_worker_processes(tmp_path):
    pytest.importorskip("apache_beam")
    pattern = _pairs_corpus(tmp_path)
    done = _prepare("--kind=pairs", "--format=webdataset", f"--paths={pattern}",
                    f"--out={tmp_path / 'out'}", "--runner=DirectRunner", "--num_workers=2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()[-3:]
    assert lines[0].startswith("prepared 7 pairs records") and "runner DirectRunner" in lines[0]
    assert lines[-1] == 'ingest_skips={"bad_record": 4}'
    done = _prepare("--kind=pairs", "--format=webdataset", f"--paths={pattern}", "--num_workers=2")
    assert "prepare: --num_workers and --beam_option need a Beam --runner" in done.stderr


def test_image_size_validates_and_downscales_images_at_ingestion(tmp_path):
    big, small = jpeg_bytes(size=(120, 90)), jpeg_bytes(size=(50, 40))
    write_tar(tmp_path / "p-0.tar", [("a.jpg", big), ("a.txt", b"big"), ("b.jpg", small), ("b.txt", b"small"),
                                     ("c.jpg", TRUNCATED), ("c.txt", b"cut"), ("d.png", jpeg_bytes(fmt="PNG")),
                                     ("d.txt", b"png")])
    pattern = str(tmp_path / "p-0.tar")
    as_is = src.prepare_source("pairs", "webdataset", paths=pattern, data_dir=str(tmp_path / "as_is"))
    assert len(as_is.data_source) == 4 and as_is.ingest_skips == {}  # bytes kept: decoded in training
    configs = {"single": tfds.download.DownloadConfig()}
    if importlib.util.find_spec("apache_beam"):
        configs["beam"] = _beam_config()
    for mode, config in configs.items():
        fitted = src.prepare_source("pairs", "webdataset", paths=pattern, data_dir=str(tmp_path / mode),
                                    image_size=45, download_config=config)
        records = {r["caption"]: r["image"] for r in map(fitted.data_source.__getitem__, range(3))}
        assert fitted.ingest_skips == {"bad_image": 1}, mode
        assert sorted(records) == [b"big", b"png", b"small"]
        assert records[b"png"] == jpeg_bytes(fmt="PNG")  # shorter side 30 <= 45: the original bytes
        shrunk = im.decode_image(records[b"big"])
        assert shrunk.shape == (45, 60, 3) and records[b"big"][:2] == b"\xff\xd8"
        assert abs(shrunk.astype(int) - (200, 30, 30)).max() <= 3  # the same colour
        assert im.decode_image(records[b"small"]).shape == (40, 50, 3)  # shorter side 40: kept as is
        assert records[b"small"] == small

    done = _prepare("--kind=pairs", "--format=webdataset", f"--paths={pattern}", f"--out={tmp_path / 'cli'}",
                    "--image_size=45")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == 'ingest_skips={"bad_image": 1}'
    with pytest.raises(ValueError, match="image_size=-1: expected 0"):
        src.prepare_source("pairs", "webdataset", paths=pattern, data_dir=str(tmp_path / "x"), image_size=-1)


BUCKET = "gs://bucket/"


@contextlib.contextmanager
def _bucket(root, seen: set[str]):
    """etils' mock backend serving gs://bucket/ from the local folder `root` (recording the
    gs:// paths used in `seen`)."""
    from etils.epath import testing as epath_testing

    def local(path):
        path = os.fspath(path)
        if path.startswith(BUCKET):
            seen.add(path)
            return path.replace(BUCKET, f"{root}/")
        return path

    def to_local(fn, *args, **kwargs):
        return fn(*[local(a) if isinstance(a, (str, os.PathLike)) else a for a in args], **kwargs)

    def glob(fn, pattern):
        return [p.replace(f"{root}/", BUCKET) for p in to_local(fn, pattern)]
    names = ("open", "exists", "isdir", "listdir", "mkdir", "makedirs", "copy", "rename",
             "replace", "remove", "rmtree", "stat")
    with epath_testing.mock_epath(glob=glob, **dict.fromkeys(names, to_local)):
        yield


def test_remote_input_files_through_epath(tmp_path):
    pattern = _pairs_corpus(tmp_path)
    local = src.prepare_source("pairs", "webdataset", paths=pattern, data_dir=str(tmp_path / "a"))
    seen: set[str] = set()
    with _bucket(tmp_path, seen):
        remote = src.prepare_source("pairs", "webdataset", paths=f"{BUCKET}p-{{0..2}}.tar",
                                    data_dir=str(tmp_path / "b"))
        globbed = src.prepare_source("pairs", "webdataset", paths=f"{BUCKET}p-*.tar",
                                     data_dir=str(tmp_path / "b"))
    assert _records(remote) == _records(local) and remote.ingest_skips == {"bad_record": 4}
    assert globbed.data_dir == remote.data_dir  # the same files: the same cache entry
    assert {f"{BUCKET}p-{i}.tar" for i in range(3)} <= seen  # read through epath, as gs:// paths
    assert remote.description == f"{BUCKET}p-0.tar, {BUCKET}p-1.tar, {BUCKET}p-2.tar"


def test_remote_output_shards_are_written_locally_and_copied_up(tmp_path):
    pattern = _pairs_corpus(tmp_path)
    files = paths.expand_paths(pattern)
    tasks = ingest.shard_tasks("pairs", files, f"{BUCKET}parts", image_dir="", system="chat",
                               clip_frames=16, clip_stride=1)
    features = tfds.features.FeaturesDict(src.FEATURES["pairs"]())
    ingester = ingest.ShardIngester(src._READERS[("pairs", "webdataset")], features)
    seen: set[str] = set()
    with _bucket(tmp_path, seen):
        results = ingest.ingest_shards(tasks, ingester)
        assert ingest.ingest_shards(tasks, ingest.ShardIngester(None, features)) == results
    parts = tmp_path / "parts"
    assert sorted(os.listdir(parts)) == sorted(f"{t.part_name}.{ext}" for t in tasks
                                               for ext in ("array_record", "json"))
    assert [r.count for r in results] == [len(ArrayRecordDataSource([str(
        parts / f"{t.part_name}.array_record")])) for t in tasks] == [4, 2, 1]
    assert f"{BUCKET}parts/{tasks[0].part_name}.json" in seen
