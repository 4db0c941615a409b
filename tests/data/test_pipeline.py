"""create_train_iterator end to end on the embedded dataset (TFDS + grain, offline) and on small
corpora with bad input."""
import json
import logging

import grain
import numpy as np
import pytest

from configs import common
from emu2_jax.data import layout, packing
from emu2_jax.data import pipeline as pl
from emu2_jax.data import tokenizer as tk

from .conftest import GARBAGE, GOOD, NOT_UTF8, TRUNCATED, data_config, jpeg_bytes, write_jsonl, write_tar

GEOMETRY = {"seq_len": 128, "batch_size": 4, "image_size": 28, "n_query": 4, "v_query": 2,
                "max_images_per_row": 8}


@pytest.fixture
def make(tok, cache_dir):
    def make(stage="stage2", seed=0, config=None, **overrides):
        cfg = config or data_config(stage)
        cfg.cache_dir = cache_dir
        return pl.create_train_iterator(cfg, tokenizer=tok, seed=seed, **{**GEOMETRY, **overrides})
    return make


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def segment_texts(tok, batch):
    out = []
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            out.append(tok.decode(tokens[seg == s], skip_special_tokens=True))
    return out


@pytest.mark.parametrize("stage", ["stage1", "stage2", "chat", "gen"])
def test_stages_yield_batch_md_batches(make, tok, stage):
    it = make(stage)
    for batch in take(it, 3):
        b, seq, n, s = 4, GEOMETRY["seq_len"], GEOMETRY["max_images_per_row"], GEOMETRY["image_size"]
        expected = {"tokens": ((b, seq), np.int32), "targets": ((b, seq), np.int32),
                    "text_loss_mask": ((b, seq), np.float32), "image_loss_mask": ((b, seq), np.float32),
                    "segment_ids": ((b, seq), np.int32), "positions": ((b, seq), np.int32),
                    "images": ((b, n, s, 3 * s), np.uint8), "image_valid": ((b, n), np.bool_),
                    "image_is_frame": ((b, n), np.bool_)}
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
        packing.check_batch(batch, tok, GEOMETRY["n_query"], GEOMETRY["v_query"])
        assert batch["image_valid"].any() and batch["text_loss_mask"].sum() + batch[
            "image_loss_mask"].sum() > 0
        assert (batch["images"][~batch["image_valid"]] == 0).all()
        if stage in ("stage1", "chat"):
            assert not batch["image_loss_mask"].any()
        if stage == "gen":
            assert not batch["text_loss_mask"].any() and batch["image_loss_mask"].any()
        if stage == "chat":
            supervised = batch["targets"][batch["text_loss_mask"] > 0]
            assert not np.isin(supervised, [tok.token_to_id(tk.USER),
                                            tok.token_to_id(tk.ASSISTANT)]).any()
    stats = it.stats()
    assert stats["data/examples"] > 0 and stats["data/skipped/bad_image"] == 0
    it.close()


def test_stage1_layout_in_batches(make, tok):
    batch = next(make("stage1"))
    img, video = tok.token_to_id(tk.IMG), tok.token_to_id(tk.VIDEO)
    for tokens, seg, mask in zip(batch["tokens"], batch["segment_ids"], batch["text_loss_mask"]):
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert tokens[where[0]] == tok.bos_id and tokens[where[1]] in (img, video)
            assert tokens[where[-1]] == tok.eos_id
            # loss from the last [/IMG] to the token before </s>: the caption and </s>
            last_end = where[0] + np.flatnonzero(tokens[where] == tok.token_to_id(tk.IMG_END))[-1]
            np.testing.assert_array_equal(np.flatnonzero(mask[where]) + where[0],
                                          np.arange(last_end, where[-1]))


@pytest.mark.parametrize("stage", ["stage2", "decoder"])
def test_batches_match_the_layout(make, stage):
    batch = next(make(stage))
    rows, size = GEOMETRY["batch_size"], GEOMETRY["image_size"]
    if stage == "decoder":
        decoder_size = data_config("decoder").decoder_image_size
        layout.check(layout.DECODER, batch, rows=rows, image_size=size, decoder_size=decoder_size)
        assert set(batch) == set(layout.keys(layout.DECODER))
    else:
        layout.check(layout.LLM, batch, rows=rows, seq_len=GEOMETRY["seq_len"],
                     slots=GEOMETRY["max_images_per_row"], image_size=size)
        assert set(batch) == set(layout.keys(layout.LLM))


def test_decoder_stage(make):
    cfg = data_config("decoder")
    cfg.decoder_image_size = d = 64
    batch = next(make(config=cfg))
    assert batch["images"].shape == (4, 28, 28, 3) and batch["images"].dtype == np.float32
    assert batch["target_images"].shape == (4, d, d, 3)
    assert batch["target_images"].min() >= -1 and batch["target_images"].max() <= 1
    assert (batch["target_size"] == d).all()
    assert (batch["original_size"] <= 448).all() and (batch["original_size"] >= d).all()
    top_left = batch["crop_coords"]
    assert (top_left >= 0).all() and (top_left.max(axis=1) > 0).any()
    scaled = np.round(batch["original_size"] * d / batch["original_size"].min(axis=1, keepdims=True))
    assert (top_left <= scaled - d).all()


def test_same_seed_same_batches(make):
    a, b, c = take(make(seed=3), 3), take(make(seed=3), 3), take(make(seed=4), 3)
    for x, y in zip(a, b):
        assert_same(x, y)
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c))


def test_resume_mid_epoch_gives_the_same_batches(make):
    it = make("stage2")
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    stats = it.stats()
    following = take(it, 4)
    restored = make("stage2")
    restored.set_state(state)
    assert restored.stats() == stats
    for x, y in zip(following, take(restored, 4)):
        assert_same(x, y)
    assert restored.stats() == it.stats()


def test_resume_through_grain_checkpoint_handler(make, tmp_path):
    it = make("chat")
    take(it, 2)
    grain.checkpoint.CheckpointHandler().save(tmp_path, item=it)
    expected = next(it)
    restored = grain.checkpoint.CheckpointHandler().restore(tmp_path, item=make("chat"))
    assert_same(expected, next(restored))


def test_worker_processes(make):
    in_process = take(make("stage1"), 3)
    cfg = data_config("stage1")
    cfg.num_workers = 1
    it = make(config=cfg)
    first = take(it, 2)
    state = it.get_state()
    third = next(it)
    it.close()
    for x, y in zip(in_process, first + [third]):
        assert_same(x, y)
    again = make(config=cfg)
    again.set_state(state)
    assert_same(third, next(again))
    again.close()


def test_host_sharding_splits_records(make, tok):
    cfg = data_config("stage1")
    cfg.sources.videos.weight = 0
    cfg.num_epochs = 1
    captions = []
    for shard in range(2):
        it = make(config=cfg, batch_size=1, shard_index=shard, shard_count=2)
        texts = [t for batch in it for t in segment_texts(tok, batch)]
        assert it.stats()["data/examples"] == 14 == len(texts)
        captions.append(set(texts))
    assert not captions[0] & captions[1] and len(captions[0] | captions[1]) == 28


def test_epochs(make):
    cfg = data_config("stage1")
    cfg.sources.videos.weight = 0
    cfg.num_epochs = 2
    it = make(config=cfg, batch_size=1)
    rows = list(it)
    assert it.stats()["data/examples"] == 56 and len(rows) >= 2
    with pytest.raises(StopIteration):
        next(it)


def test_mixture_follows_the_weights(make):
    it = make("stage2", batch_size=8)
    take(it, 12)
    stats = it.stats()
    cfg = data_config("stage2")
    total_weight = sum(s.weight for s in cfg.sources.values())
    for name, source in cfg.sources.items():
        share = stats[f"data/examples/{name}"] / stats["data/examples"]
        assert abs(share - source.weight / total_weight) < 0.04, (name, share)


def test_video_frames_are_clamped_to_the_row(make, tok):
    batch = next(make("stage1", max_images_per_row=2))
    packing.check_batch(batch, tok, 4, 2)
    assert batch["image_valid"].shape == (4, 2)


@pytest.fixture
def bad_corpus(tmp_path):
    """One small corpus per format, each mixing good records with every kind of bad input."""
    pairs = write_tar(tmp_path / "pairs.tar", [
        ("a.jpg", GOOD), ("a.txt", b"good caption one"),
        ("b.png", jpeg_bytes(fmt="PNG")), ("b.txt", b"good caption two"),
        ("c.jpg", TRUNCATED), ("c.txt", b"truncated zebra"),
        ("d.jpg", GARBAGE), ("d.txt", b"undecodable zebra"),
        ("e.jpg", GOOD), ("e.txt", NOT_UTF8),
        ("f.jpg", GOOD), ("f.txt", b"   "),
        ("g.jpg", b""), ("g.txt", b"empty image zebra"),
    ])
    grit = write_tar(tmp_path / "grit.tar", [
        ("a.jpg", GOOD), ("a.json", json.dumps({"caption": "a red box", "noun_chunks": [
            [0, 9, 0.1, 0.1, 0.9, 0.9, 1.0]]}).encode()),
        ("b.jpg", GOOD), ("b.json", json.dumps({"caption": "outside giraffe", "noun_chunks": [
            [0, 7, 0.1, 0.1, 1.5, 0.9, 1.0]]}).encode()),
        ("c.jpg", GOOD), ("c.json", json.dumps({"caption": "bad span giraffe", "noun_chunks": [
            [0, 70, 0.1, 0.1, 0.5, 0.9, 1.0]]}).encode()),
    ])
    text = write_jsonl(tmp_path / "text.jsonl", [
        {"text": "A short good document."}, {"text": ""}, {"text": "walrus " * 100}])
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(GOOD)
    mmc4 = write_jsonl(tmp_path / "mmc4.jsonl", [
        {"text_list": ["Good sentence.", "Another."],
         "image_info": [{"image_name": "ok.jpg", "matched_text_index": 0},
                        {"image_name": "missing.jpg", "matched_text_index": 1}]},
        {"text_list": ["otter " * 20, "otter " * 20],  # 240 characters in all
         "image_info": [{"image_name": "ok.jpg", "matched_text_index": 1}]}])
    cfg = data_config("stage2")
    cfg.sources = {
        "pairs": common.source("image_text", "webdataset", 1, paths=pairs),
        "grit": common.source("grounded", "grit", 1, paths=grit),
        "pile": common.source("text", "jsonl", 1, paths=text),
        "mmc4": common.source("interleaved", "mmc4", 1, paths=mmc4, image_dir=str(images)),
    }
    cfg.max_document_chars = 200
    return cfg


def test_bad_input_is_counted_and_never_batched(make, tok, bad_corpus, caplog):
    it = make(config=bad_corpus, batch_size=2)
    with caplog.at_level(logging.WARNING):
        batches = take(it, 12)
    stats = it.stats()
    for reason in ("bad_image", "bad_text", "empty_text", "box_outside_image", "bad_annotation",
                   "too_long"):
        assert stats[f"data/skipped/{reason}"] > 0, reason
    assert stats["data/skipped/bad_image"] == stats["data/skipped/pairs/bad_image"]
    assert stats["data/skipped/too_long"] == (stats["data/skipped/pile/too_long"]
                                              + stats["data/skipped/mmc4/too_long"])
    assert stats["data/ingest_skipped/missing_file"] == 1
    assert stats["data/examples"] > 0
    assert any("skipped so far for bad_image" in r.getMessage() for r in caplog.records)
    texts = " ".join(t for b in batches for t in segment_texts(tok, b))
    assert "good caption one" in texts and "A short good document." in texts
    for word in ("zebra", "giraffe", "walrus", "otter"):
        assert word not in texts
    for b in batches:
        packing.check_batch(b, tok, GEOMETRY["n_query"], GEOMETRY["v_query"])


def test_source_with_nothing_usable_is_an_error_naming_it(make, tmp_path):
    broken = write_tar(tmp_path / "all-broken.tar", [
        ("a.jpg", GARBAGE), ("a.txt", b"x"), ("b.jpg", TRUNCATED), ("b.txt", b"y")])
    cfg = data_config("stage1")
    cfg.sources.broken = common.source("image_text", "webdataset", 1, paths=broken)
    it = make(config=cfg)
    with pytest.raises(ValueError, match="all-broken.tar"):
        take(it, 20)


def test_config_errors(make):
    cfg = data_config("stage1")
    cfg.stage = "stage3"
    with pytest.raises(ValueError, match="unknown stage"):
        make(config=cfg)
    del cfg.sources.pairs.system
    with pytest.raises(ValueError, match=r"sources.pairs lacks \['system'\]"):
        make(config=cfg)
    del cfg.sources
    with pytest.raises(ValueError, match=r"lacks \['sources'\]"):
        make(config=cfg)
    with pytest.raises(ValueError, match="paths is empty"):
        make(config=data_config("stage1", tiny=False))
    cfg = data_config("stage2")
    cfg.sources.pairs.builder = "decoder"
    with pytest.raises(ValueError, match="does not belong to stage"):
        make(config=cfg)
    with pytest.raises(ValueError, match="shard_index"):
        make(shard_index=2, shard_count=2)


def _rows(source, n, examples_per_row, count=2):
    def row(i):
        examples = np.zeros(count, np.int64)
        examples[source] = examples_per_row
        return {"source": source, "index": i, "_examples": examples}
    return grain.MapDataset.range(n).map(row).to_iter_dataset()


@pytest.mark.parametrize("balance,expected", [("rows", (30, 10)), ("samples", (15, 25))])
def test_mixing_by_rows_or_samples_and_exhaustion(balance, expected):
    # source 0 packs 5 examples per row, source 1 one; weights 3:1 (of rows, or of examples: 75:25)
    mixed = pl._MixRows([_rows(0, 1000, 5), _rows(1, 1000, 1)], [3, 1], balance)
    it = iter(mixed)
    first = [next(it) for _ in range(40)]
    counts = [sum(r["source"] == k for r in first) for k in (0, 1)]
    assert tuple(counts) == expected
    state = it.get_state()
    following = [(r["source"], r["index"]) for r in (next(it) for _ in range(10))]
    again = iter(mixed)
    again.set_state(state)
    assert [(r["source"], r["index"]) for r in (next(again) for _ in range(10))] == following
    finite = list(pl._MixRows([_rows(0, 3, 1), _rows(1, 5, 1)], [1, 1], balance))
    assert [r["source"] for r in finite] == [0, 1, 0, 1, 0, 1, 1, 1]


def test_paths_on_an_embedded_source_are_refused(make):
    cfg = data_config("stage1")
    cfg.sources.pairs.paths = "/data/laion-{000..009}.tar"
    with pytest.raises(ValueError, match=r"data\.sources\.pairs\.paths is set but "
                                         r"data\.sources\.pairs\.format is 'embedded'.*webdataset"):
        make(config=cfg)


def test_state_saved_before_a_new_skip_reason_restores(make):
    it = make("stage1")
    next(it)
    state = it.get_state()
    state["skips"] = [row[:-1] for row in state["skips"]]  # a checkpoint with one reason fewer
    again = make("stage1")
    again.set_state(state)
    next(again)
    assert again.stats()["data/skipped/unsafe_path"] == 0
