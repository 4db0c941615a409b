"""TFDS sources: builders that ingest Emu2's corpora from their files into ArrayRecord, and
`prepare_source`, which builds a source once (cached by its inputs) and opens it for reading.

One builder per record kind (`KINDS`); each takes a `SourceConfig` naming the on-disk format
(`formats` reads the real ones, `embedded` the dataset shipped with the package) and its paths.
Records keep encoded image bytes and raw text bytes as plain `Tensor(dtype=object)` features, so
neither writing nor reading needs TensorFlow; decoding and validation happen in the input
pipeline, where bad examples are counted. What ingestion itself has to drop is counted per
reason, logged and stored in the dataset's metadata ("ingest_skips"). A source without a single
usable record is an error naming its paths. Each input file becomes one output shard, in this
process or on Apache Beam, resumably (`ingest`); `python -m emu2_jax.data.prepare` runs it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.dataset_builder import FileReaderBuilder

from emu2_jax.data import embedded, formats, ingest, storyboard, video
from emu2_jax.data import paths as input_paths

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/emu2_jax/tfds"
CACHE_ENV = "EMU2_JAX_DATA_CACHE"
# Frames kept of each video file at ingestion (training samples `video_frames` of them).
CLIP_FRAMES = 16
KINDS = ("pairs", "videos", "interleaved", "grounded", "text", "chat", "edits")
# (kind, format) -> reader; every kind also reads from the embedded dataset.
_READERS: dict[tuple[str, str], formats.Reader] = {
    **{(kind, "embedded"): embedded.reader(kind) for kind in KINDS}, **formats.READERS,
    ("interleaved", "storyboard"): storyboard.read}
FORMATS = {kind: tuple(f for k, f in _READERS if k == kind) for kind in KINDS}


def _bytes_feature():
    return tfds.features.Tensor(shape=(), dtype=np.object_)


def _seq(feature):
    return tfds.features.Sequence(feature)


FEATURES = {
    "pairs": lambda: {"key": _bytes_feature(), "image": _bytes_feature(),
                      "caption": _bytes_feature()},
    "videos": lambda: {"key": _bytes_feature(), "frames": _seq(_bytes_feature()),
                       "caption": _bytes_feature()},
    "interleaved": lambda: {
        "key": _bytes_feature(), "sentences": _seq(_bytes_feature()),
        "images": _seq(_bytes_feature()),
        "image_sentence": _seq(tfds.features.Tensor(shape=(), dtype=np.int32))},
    "grounded": lambda: {
        "key": _bytes_feature(), "image": _bytes_feature(), "caption": _bytes_feature(),
        "spans": tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32)},
    "text": lambda: {"key": _bytes_feature(), "text": _bytes_feature()},
    "chat": lambda: {
        "key": _bytes_feature(), "system": _bytes_feature(),
        "grounding": tfds.features.Tensor(shape=(), dtype=np.bool_),
        "users": _seq(_bytes_feature()), "assistants": _seq(_bytes_feature()),
        "images": _seq(_bytes_feature()), "video_frames": _seq(_bytes_feature()),
        "video_lengths": _seq(tfds.features.Tensor(shape=(), dtype=np.int32))},
    "edits": lambda: {"key": _bytes_feature(), "source": _bytes_feature(),
                      "target": _bytes_feature(), "instruction": _bytes_feature()},
}


class SourceConfig(tfds.core.BuilderConfig):
    """Where a source's raw files are (the `formats.Inputs` its reader gets). `name` is derived
    from the format and a hash of the inputs (the set of files with their sizes and mtimes,
    image_dir, system, the video sampling) and of the ingestion code, so a change of either gives
    a fresh entry."""

    def __init__(self, *, fmt: str, paths: Sequence[str] = (), image_dir: str = "",
                 system: str = "chat", clip_frames: int = CLIP_FRAMES, clip_stride: int = 1,
                 image_size: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.fmt, self.paths, self.image_dir, self.system = fmt, tuple(paths), image_dir, system
        self.clip_frames, self.clip_stride, self.image_size = clip_frames, clip_stride, image_size


class _Emu2Builder(FileReaderBuilder):
    """Shared plumbing: features per kind, one 'train' split of one shard per input file,
    ingest skip counting."""

    VERSION = tfds.core.Version("1.0.0")
    KIND = ""
    # No download checksums to look up; TFDS 4.9's lookup of them imports `importlib_resources`,
    # which it only declares for Python < 3.9.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=f"Emu2 {self.KIND} records ({self.builder_config.fmt})",
            features=tfds.features.FeaturesDict(FEATURES[self.KIND]()),
            metadata=tfds.core.MetadataDict())

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Fixed now: while TFDS builds the dataset, data_dir names its temporary folder.
        self._parts_dir = ingest.parts_dir_of(self.data_dir)

    def _download_and_prepare(self, dl_manager, download_config):
        """Ingests every input file (on Beam when `download_config` names a runner or options)."""
        del dl_manager
        cfg: SourceConfig = self.builder_config
        tasks = ingest.shard_tasks(self.KIND, cfg.paths, self._parts_dir, image_dir=cfg.image_dir,
                                   system=cfg.system, clip_frames=cfg.clip_frames,
                                   clip_stride=cfg.clip_stride, image_size=cfg.image_size)
        ingester = ingest.ShardIngester(_READERS[(self.KIND, cfg.fmt)], self.info.features)
        results = ingest.ingest_shards(tasks, ingester, beam_runner=download_config.beam_runner,
                                       beam_options=download_config.beam_options)
        skips = sum((Counter(r.skips) for r in results), Counter())
        count = sum(r.count for r in results)
        self.info.metadata["ingest_skips"] = dict(skips)
        if skips:
            log.warning("ingesting %s %s from %s skipped %s", self.KIND, cfg.fmt,
                        _describe(cfg), dict(skips))
        if count == 0:
            raise ValueError(f"no usable {self.KIND} record in {_describe(cfg)} "
                             f"(skipped: {dict(skips) or 'nothing found'})")
        split = ingest.move_into_dataset(tasks, results, self._get_filename_template("train"),
                                         "train")
        self.info.set_splits(tfds.core.SplitDict([split]))


def _describe(cfg: SourceConfig) -> str:
    if cfg.fmt == "embedded":
        return str(embedded.DIR)
    where = ", ".join(cfg.paths)
    return where + (f" (images under {cfg.image_dir})" if cfg.image_dir else "")


class Emu2Pairs(_Emu2Builder):
    KIND = "pairs"


class Emu2Videos(_Emu2Builder):
    KIND = "videos"


class Emu2Interleaved(_Emu2Builder):
    KIND = "interleaved"


class Emu2Grounded(_Emu2Builder):
    KIND = "grounded"


class Emu2Text(_Emu2Builder):
    KIND = "text"


class Emu2Chat(_Emu2Builder):
    KIND = "chat"


class Emu2Edits(_Emu2Builder):
    KIND = "edits"


BUILDERS = {cls.KIND: cls for cls in (Emu2Pairs, Emu2Videos, Emu2Interleaved, Emu2Grounded,
                                      Emu2Text, Emu2Chat, Emu2Edits)}


# ------------------------------------------------------------------------------------------------
# Preparing and opening a source
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PreparedSource:
    data_source: Any            # random-access ArrayRecord source (len, __getitem__)
    ingest_skips: dict[str, int]
    description: str            # the paths, for error messages
    data_dir: str               # the dataset's folder


def cache_dir(configured: str = "") -> epath.Path:
    """The TFDS data_dir: local, `file://` or remote (gs://, s3://)."""
    return epath.Path(input_paths.local_or_uri(
        configured or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR))


def prepare_source(kind: str, fmt: str, *, paths: str | Sequence[str] = "", image_dir: str = "",
                   system: str = "chat", data_dir: str = "", clip_frames: int = CLIP_FRAMES,
                   clip_stride: int = 1, image_size: int = 0,
                   download_config: tfds.download.DownloadConfig | None = None) -> PreparedSource:
    """Builds the ArrayRecord dataset for a source if it is not cached yet, then opens it with
    `as_data_source`. The embedded dataset builds in about a second on first use.

    `download_config` with a `beam_runner` or `beam_options` ingests on Beam; a run that failed
    resumes at the first input file it had not finished (`ingest`). `image_size` > 0 decodes every
    image at ingestion (bad ones are counted skips) and stores those larger than that (shorter side)
    downscaled to it (`images.fit_for_storage`)."""
    if image_size < 0:
        raise ValueError(f"image_size={image_size}: expected 0 (images as they are) or a size in pixels")
    if kind not in BUILDERS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
    if fmt not in FORMATS[kind]:
        raise ValueError(f"{kind} records cannot be read from format {fmt!r}; "
                         f"supported: {FORMATS[kind]}")
    if fmt == "embedded":
        files, digest_inputs = [], [_embedded_digest()]
    else:
        files = input_paths.expand_paths(paths)
        image_dir = input_paths.local_or_uri(image_dir) if image_dir else ""
        if image_dir and not os.path.isdir(image_dir):  # local only: records name files in it
            raise FileNotFoundError(f"image_dir {image_dir!r} is not a local directory")
        # The set of files (order-free: the same files listed differently are the same dataset).
        digest_inputs = sorted(_file_identity(f) for f in files)
        digest_inputs += [image_dir, system]
        if kind == "videos":  # only video files are sampled
            digest_inputs += [f"clip:{clip_frames}:{clip_stride}"]
    if image_size:
        digest_inputs.append(f"image_size:{image_size}")
    digest_inputs.append(CODE_DIGEST)  # a fix in the readers re-ingests instead of reusing
    digest = hashlib.sha1("\n".join(digest_inputs).encode()).hexdigest()[:12]
    config = SourceConfig(name=f"{fmt}-{digest}", fmt=fmt, paths=files,
                          image_dir=image_dir, system=system,
                          clip_frames=clip_frames, clip_stride=clip_stride,
                          image_size=image_size, description=f"{fmt} {kind}")
    builder = BUILDERS[kind](config=config, data_dir=str(cache_dir(data_dir)))
    cached = builder.is_prepared()
    if not cached:
        tfds.disable_progress_bar()
        builder.download_and_prepare(file_format="array_record", download_config=download_config)
    metadata = builder.info.metadata or {}
    skips = {k: int(v) for k, v in metadata.get("ingest_skips", {}).items()}
    if skips and cached:  # ingestion logged them once; every later use says them again
        log.warning("cached %s %s from %s (%s) was ingested with records skipped: %s", kind, fmt,
                    _describe(config), builder.data_dir, skips)
    return PreparedSource(builder.as_data_source(split="train"), skips, _describe(config),
                          os.fspath(builder.data_dir))


def _file_identity(path: str) -> str:
    """path:size:mtime (local paths made absolute; remote ones through epath)."""
    stat = epath.Path(path).stat()
    where = path if "://" in path else os.path.abspath(path)
    return f"{where}:{stat.length}:{stat.mtime}"


def _code_digest() -> str:
    """The ingestion code's version: the source of the readers, builders and ingestion."""
    h = hashlib.sha1()
    for module in (formats.__file__, __file__, embedded.__file__, ingest.__file__, video.__file__,
                   storyboard.__file__):
        h.update(pathlib.Path(module).read_bytes())
    return h.hexdigest()


CODE_DIGEST = _code_digest()


def _embedded_digest() -> str:
    h = hashlib.sha1()
    for path in sorted(embedded.DIR.rglob("*")):
        if path.is_file() and path.suffix in (".jsonl", ".jpg", ".png"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()
