"""Grain input pipeline for every Emu2 training stage: checkpointable iterators over the sources.

Interface used by the training code:

    tokenizer = load_tokenizer(data_config.tokenizer_path or None)        # emu2_jax.data.tokenizer
    it = create_train_iterator(data_config, tokenizer=tokenizer, seq_len=L, batch_size=B,
                               image_size=S, n_query=n, v_query=v, max_images_per_row=N,
                               seed=seed, shard_index=jax.process_index(),
                               shard_count=jax.process_count())
    batch = next(it)          # dict of numpy arrays, per host
    it.get_state() / it.set_state(state)   # JSON-serialisable; grain.checkpoint.CheckpointSave(it)
    it.stats()                # {'data/skipped/<reason>': n, 'data/examples': n, ...} for logging
    it.close()                # stops worker processes

Batches follow `layout.LLM` (stages stage1, stage2, chat, gen) or `layout.DECODER` (stage
'decoder'), defined in emu2_jax/data/layout.py and explained in docs/batch.md. The data config,
mixture (`sources`) included, comes from the stage's config file (configs/<stage>.py, defaults in
configs/common.py); `:tiny` configs read the embedded dataset (emu2_jax/data/embedded, no download).

Pipeline per source (host shard of a TFDS ArrayRecord source): shard by process index ->
seeded shuffle (reshuffled every epoch) -> repeat -> random_map(decode + build one Example, or a
`Skipped` marker for bad input) -> packing into rows of seq_len tokens / N image slots (greedy, in
order; text-only documents continue across rows) -> mixing of the sources' rows (deterministic,
proportional to the per-source weights, counted in examples or rows) -> batch -> optional worker
processes (`mp_prefetch`) -> skip/example counters. Every stage keeps checkpointable state.

The module is a little over 400 lines because these grain stages share their source bookkeeping
(`_SourceInfo`, `_SkipTracker`) and checkpoint state; they read best as one chain in one file.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import zlib
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from emu2_jax.data import layout, packing, records
from emu2_jax.data import sources as src
from emu2_jax.data import tokenizer as tk
from emu2_jax.data.assembly import Context, Example
from emu2_jax.data.skips import REASON_INDEX, REASONS, Skipped

log = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "chat", "gen", "decoder", "video_decoder")
_DECODER_STAGES = {"decoder": layout.DECODER, "video_decoder": layout.VIDEO_DECODER}  # builder = stage
# Data config fields read here (records.Options reads its own); configs/common.py sets them all.
_FIELDS = ("stage", "cache_dir", "sources", "balance", "shuffle", "num_epochs", "num_workers",
           "worker_buffer_size", "read_threads", "read_buffer_size", "max_consecutive_skips")
_SOURCE_FIELDS = ("builder", "format", "paths", "image_dir", "weight", "system")


# ------------------------------------------------------------------------------------------------
# Checkpointable iterator stages
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _SourceInfo:
    index: int
    count: int           # number of sources (shape of the skip counters)
    name: str
    description: str
    skip_limit: int


class _SkipTracker:
    """Counts Skipped markers of one source and fails when it yields nothing usable."""

    def __init__(self, info: _SourceInfo, consecutive: int = 0):
        self.info = info
        self.consecutive = consecutive
        self.recent: dict[str, int] = {}
        self.counts = np.zeros((info.count, len(REASONS)), np.int64)

    def observe(self, element) -> bool:
        """True if `element` is usable, False (after counting) if it is a Skipped marker."""
        if not isinstance(element, Skipped):
            self.consecutive, self.recent = 0, {}
            return True
        self.counts[self.info.index, REASON_INDEX[element.reason]] += 1
        self.consecutive += 1
        self.recent[element.reason] = self.recent.get(element.reason, 0) + 1
        if self.consecutive >= self.info.skip_limit:
            raise ValueError(
                f"data source {self.info.name!r} ({self.info.description}) yielded no usable "
                f"example in {self.consecutive} consecutive records; skipped: {self.recent}")
        return False

    def take(self) -> np.ndarray:
        counts, self.counts = self.counts, np.zeros_like(self.counts)
        return counts


class _PackRows(grain.IterDataset):
    """Examples (and Skipped markers) of one source -> packed rows with counters attached."""

    def __init__(self, parent: grain.IterDataset, info: _SourceInfo, *, seq_len: int,
                 max_images: int, image_size: int, pad_id: int):
        super().__init__(parent)
        self.info = info
        self.geometry = (seq_len, max_images, image_size, pad_id)

    def __iter__(self):
        return _PackRowsIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"_PackRows({self.info.name})"


class _PackRowsIterator(grain.DatasetIterator):
    """State: the parent's state before the example that did not fit yet (re-read on restore)
    and how much of it (a split text document) was already emitted."""

    def __init__(self, parent: grain.DatasetIterator, ds: _PackRows):
        super().__init__(parent)
        self._info = ds.info
        self._packer = packing.RowPacker(*ds.geometry)
        self._skips = _SkipTracker(ds.info)
        self._pending: Example | None = None
        self._pending_state: dict | None = None
        self._offset = 0
        self._resume_offset = 0

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            if self._pending is None:
                state = self._parent.get_state()
                try:
                    element = next(self._parent)
                except StopIteration:
                    if self._packer.used:
                        break
                    raise
                if not self._skips.observe(element):
                    continue
                self._pending, self._pending_state = element, state
                self._offset, self._resume_offset = self._resume_offset, 0
            new = packing.place(self._packer, self._pending, self._offset)
            progressed, self._offset = new != self._offset, new
            if new >= len(self._pending):
                self._pending, self._offset = None, 0
            if not progressed or self._packer.free == 0:
                break
        examples = np.zeros(self._info.count, np.int64)
        examples[self._info.index] = self._packer.samples
        row = self._packer.finish()
        row["_skips"], row["_examples"] = self._skips.take(), examples
        return row

    def get_state(self) -> dict[str, Any]:
        if self._pending is not None:
            parent, offset = self._pending_state, self._offset
        else:
            parent, offset = self._parent.get_state(), self._resume_offset
        return {"parent": parent, "offset": int(offset),
                "consecutive_skips": int(self._skips.consecutive)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._pending_state, self._offset = None, None, 0
        self._resume_offset = int(state["offset"])
        self._skips = _SkipTracker(self._info, int(state["consecutive_skips"]))
        self._packer.reset()


class _DropSkipped(grain.IterDataset):
    """Decoder stage: one element per example, Skipped markers counted and dropped."""

    def __init__(self, parent: grain.IterDataset, info: _SourceInfo):
        super().__init__(parent)
        self.info = info

    def __iter__(self):
        return _DropSkippedIterator(self._parent.__iter__(), self.info)


class _DropSkippedIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, info: _SourceInfo):
        super().__init__(parent)
        self._info = info
        self._skips = _SkipTracker(info)

    def __next__(self) -> dict[str, np.ndarray]:
        element = next(self._parent)
        while not self._skips.observe(element):
            element = next(self._parent)
        examples = np.zeros(self._info.count, np.int64)
        examples[self._info.index] = 1
        return {**element, "_skips": self._skips.take(), "_examples": examples}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(),
                "consecutive_skips": int(self._skips.consecutive)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._skips = _SkipTracker(self._info, int(state["consecutive_skips"]))


class _MixRows(grain.IterDataset):
    """Deterministic weighted interleaving of the sources' rows: the next row comes from the
    source whose count (examples or rows so far) divided by its weight is smallest, so the
    long-run shares match the weights exactly. Exhausted sources (finite epochs) drop out."""

    def __init__(self, parents: Sequence[grain.IterDataset], weights: Sequence[float],
                 balance: str):
        super().__init__(list(parents))
        if balance not in ("samples", "rows"):
            raise ValueError(f"balance must be 'samples' or 'rows', got {balance!r}")
        self.weights, self.balance = tuple(weights), balance

    def __iter__(self):
        return _MixRowsIterator([p.__iter__() for p in self._parents], self)


class _MixRowsIterator(grain.DatasetIterator):

    def __init__(self, parents: list[grain.DatasetIterator], ds: _MixRows):
        super().__init__(parents)
        self._weights, self._balance = ds.weights, ds.balance
        self._counts = [0] * len(parents)
        self._exhausted = [False] * len(parents)

    def __next__(self):
        while True:
            live = [k for k, done in enumerate(self._exhausted) if not done]
            if not live:
                raise StopIteration
            k = min(live, key=lambda k: (self._counts[k] / self._weights[k], k))
            try:
                row = next(self._parents[k])
            except StopIteration:
                self._exhausted[k] = True
                continue
            self._counts[k] += int(row["_examples"].sum()) if self._balance == "samples" else 1
            return row

    def get_state(self) -> dict[str, Any]:
        return {"parents": [p.get_state() for p in self._parents], "counts": list(self._counts),
                "exhausted": list(self._exhausted)}

    def set_state(self, state: dict[str, Any]) -> None:
        for parent, parent_state in zip(self._parents, state["parents"]):
            parent.set_state(parent_state)
        self._counts = [int(c) for c in state["counts"]]
        self._exhausted = [bool(e) for e in state["exhausted"]]


def _stack(fields: layout.Layout, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Batch of the layout's arrays (rows already hold them at their dtypes), with the rows'
    skip / example counters summed."""
    batch = {f.name: np.stack([r[f.name] for r in rows]).astype(f.dtype, copy=False)
             for f in fields}
    batch["_skips"] = np.sum([r["_skips"] for r in rows], axis=0)
    batch["_examples"] = np.sum([r["_examples"] for r in rows], axis=0)
    return batch


class _CollectStats(grain.IterDataset):
    """Last stage (main process): pops the counters off each batch and accumulates them."""

    def __init__(self, parent: grain.IterDataset, names: Sequence[str],
                 ingest: Sequence[dict[str, int]]):
        super().__init__(parent)
        self.names, self.ingest = tuple(names), tuple(ingest)

    def __iter__(self):
        return TrainIterator(self._parent.__iter__(), self)


class TrainIterator(grain.DatasetIterator):
    """What `create_train_iterator` returns: batches, get_state/set_state, stats()."""

    def __init__(self, parent: grain.DatasetIterator, ds: _CollectStats):
        super().__init__(parent)
        self._names, self._ingest = ds.names, ds.ingest
        self._skips = np.zeros((len(ds.names), len(REASONS)), np.int64)
        self._examples = np.zeros(len(ds.names), np.int64)
        self._logged = np.zeros_like(self._skips)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        self._skips += batch.pop("_skips")
        self._examples += batch.pop("_examples")
        grown = self._skips >= np.maximum(2 * self._logged, 1)
        for s, r in zip(*np.nonzero(grown)):
            log.warning("data source %r: %d examples skipped so far for %s", self._names[s],
                        self._skips[s, r], REASONS[r])
            self._logged[s, r] = self._skips[s, r]
        return batch

    def stats(self) -> dict[str, int]:
        """Skips per reason (runtime: 'data/skipped/...', at ingest: 'data/ingest_skipped/...'),
        per source when non-zero, and examples consumed."""
        out = {"data/examples": int(self._examples.sum())}
        for s, name in enumerate(self._names):
            out[f"data/examples/{name}"] = int(self._examples[s])
        for r, reason in enumerate(REASONS):
            out[f"data/skipped/{reason}"] = int(self._skips[:, r].sum())
            out[f"data/ingest_skipped/{reason}"] = sum(i.get(reason, 0) for i in self._ingest)
            for s, name in enumerate(self._names):
                if self._skips[s, r]:
                    out[f"data/skipped/{name}/{reason}"] = int(self._skips[s, r])
        return out

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "skips": self._skips.tolist(),
                "examples": self._examples.tolist()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        # Reasons are only ever appended: a checkpoint from before a new one has fewer columns.
        saved = np.asarray(state["skips"], np.int64).reshape(len(self._names), -1)
        self._skips = np.zeros_like(self._skips)
        self._skips[:, :saved.shape[1]] = saved
        self._examples = np.asarray(state["examples"], np.int64).reshape(self._examples.shape)
        self._logged = self._skips.copy()


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

def embedded_with_paths(name: str, builder: str) -> str:
    """The error for paths given to a source whose format is 'embedded' (the bundled data would
    silently stand in for them)."""
    formats = [f for f in src.FORMATS[records.RECORD_KINDS[builder]] if f != "embedded"]
    return (f"data.sources.{name}.paths is set but data.sources.{name}.format is 'embedded', "
            f"which ignores paths: set --config.data.sources.{name}.format to one of {formats}")


def config_errors(data_config: ml_collections.ConfigDict) -> list[str]:
    """Source settings that would train on other data than asked, checked before any work."""
    return [embedded_with_paths(name, s.builder) for name, s in sorted(data_config.sources.items())
            if s.get("format") == "embedded" and s.get("paths") and s.get("builder") in records.RECORD_KINDS]


def _seed(seed: int, *parts: Any) -> int:
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode())


def create_train_iterator(data_config: ml_collections.ConfigDict, *, tokenizer: tk.Tokenizer,
                          seq_len: int, batch_size: int, image_size: int, n_query: int,
                          v_query: int, max_images_per_row: int, seed: int, shard_index: int = 0,
                          shard_count: int = 1) -> TrainIterator:
    """Per-host iterator of training batches: `layout.LLM` arrays, or `layout.DECODER` ones for
    the decoder stage.

    `batch_size` is per host; sharding takes records shard_index::shard_count of every source.
    Deterministic given `seed` (and the config); resumable with get_state/set_state.
    """
    cfg = data_config
    missing = [k for k in (*_FIELDS, *records.Options.config_fields()) if k not in cfg]
    if missing:
        raise ValueError(f"data config lacks {missing}")
    for name, s in cfg.sources.items():
        missing = [k for k in _SOURCE_FIELDS if k not in s]
        if missing:
            raise ValueError(f"data.sources.{name} lacks {missing}")
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; expected one of {STAGES}")
    if min(seq_len, batch_size, image_size, n_query, v_query, max_images_per_row) < 1:
        raise ValueError("seq_len, batch_size, image_size, n_query, v_query and "
                         "max_images_per_row must all be positive")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside [0, {shard_count})")
    active = [(name, s) for name, s in sorted(cfg.sources.items()) if s.weight > 0]
    if not active:
        raise ValueError("no data source with a positive weight in data.sources")
    decoder_stage = cfg.stage in _DECODER_STAGES
    for name, s in active:
        if s.builder not in records.RECORD_KINDS:
            raise ValueError(f"data.sources.{name}.builder {s.builder!r} not in "
                             f"{tuple(records.RECORD_KINDS)}")
        if (s.builder in _DECODER_STAGES or cfg.stage in _DECODER_STAGES) and s.builder != cfg.stage:
            raise ValueError(f"data.sources.{name}: builder {s.builder!r} does not belong to "
                             f"stage {cfg.stage!r}")
        if s.format == "embedded" and s.paths:
            raise ValueError(embedded_with_paths(name, s.builder))
        if s.format != "embedded" and not s.paths:
            raise ValueError(f"data.sources.{name}.paths is empty: point it at the {s.format} "
                             f"files of this source, or set its weight to 0")
    ctx = Context(tokenizer, n_query=n_query, v_query=v_query, max_len=seq_len,
                  max_images=max_images_per_row)
    opts = records.Options.from_config(cfg, image_size)
    if cfg.video_frames > max_images_per_row:
        log.warning("video_frames=%d > max_images_per_row=%d: videos get %d frames",
                    cfg.video_frames, max_images_per_row, max_images_per_row)

    rows, names, ingest = [], [], []
    for k, (name, s) in enumerate(active):
        prepared = src.prepare_source(records.RECORD_KINDS[s.builder], s.format, paths=s.paths,
                                      image_dir=s.image_dir, system=s.system,
                                      data_dir=cfg.cache_dir,
                                      # optional: hand-written source configs may lack them
                                      clip_frames=s.get("clip_frames", src.CLIP_FRAMES),
                                      clip_stride=s.get("clip_stride", 1),
                                      image_size=s.get("image_size", 0))
        ds = grain.MapDataset.source(prepared.data_source)[shard_index::shard_count]
        if len(ds) == 0:
            raise ValueError(f"data source {name!r} ({prepared.description}) has no record for "
                             f"shard {shard_index} of {shard_count}")
        info = _SourceInfo(k, len(active), name, prepared.description,
                           skip_limit=max(1, min(cfg.max_consecutive_skips, 2 * len(ds))))
        if cfg.shuffle:
            ds = ds.shuffle(seed=_seed(seed, name, "shuffle"))
        ds = ds.repeat(cfg.num_epochs or None)
        ds = ds.random_map(records.Processor(s.builder, ctx, opts), seed=_seed(seed, name, "build"))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                  prefetch_buffer_size=cfg.read_buffer_size))
        if decoder_stage:
            rows.append(_DropSkipped(it, info))
        else:
            rows.append(_PackRows(it, info, seq_len=seq_len, max_images=max_images_per_row,
                                  image_size=image_size, pad_id=tokenizer.pad_id))
        names.append(name)
        ingest.append(prepared.ingest_skips)
    mixed = _MixRows(rows, [s.weight for _, s in active], cfg.balance)
    fields = _DECODER_STAGES.get(cfg.stage, layout.LLM)
    batched = mixed.batch(batch_size, drop_remainder=True,
                          batch_fn=functools.partial(_stack, fields))
    if cfg.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults are fine)
            flags.FLAGS.mark_as_parsed()
        batched = batched.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size))
    return iter(_CollectStats(batched, names, ingest))
