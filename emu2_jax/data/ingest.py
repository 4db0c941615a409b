"""Ingestion shard by shard: every input file (a tar shard, a jsonl file) becomes one ArrayRecord
shard of the dataset, in this process or as an Apache Beam pipeline that reads the input files in
parallel (`beam_runner`: DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...).

Resumable: each finished input file leaves its output shard and a small json (its record count
and skips per reason) in a staging folder beside the dataset (`<version>.parts`), both written to
a temporary name and renamed, so a file cut short by a crash is never taken for a finished one.
A run after a failure ingests only the input files without that json; when all are done the
shards move into TFDS's dataset folder and the staging folder goes. A retried or duplicated task
(Beam reruns failed bundles, Dataflow may run stragglers twice) rewrites the same two files, so
ingestion is idempotent.

Not TFDS's own Beam path (`_generate_examples` returning a PTransform): that one shuffles every
example into new shards inside a temporary folder it deletes on failure, so a failed run keeps
nothing to resume from.

Skips are summed from the jsons (so a resumed run still reports those of earlier runs); a Beam run
also reports the skips of the files it ingested as Beam counters (namespace `emu2_ingest`, names
`<kind>/<reason>`), which runners show while the job runs.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import example_serializer, file_adapters, naming
from tensorflow_datasets.core import writer as writer_lib
from tensorflow_datasets.core.utils.lazy_imports_utils import apache_beam as beam

from emu2_jax.data import formats
from emu2_jax.data import images as im
from emu2_jax.data.skips import SkipExample

log = logging.getLogger(__name__)

COUNTER_NAMESPACE = "emu2_ingest"
# Record fields holding encoded images (sources.FEATURES): one image, or a sequence of them.
IMAGE_FIELDS = ("image", "source", "target")
IMAGE_LIST_FIELDS = ("images", "frames", "video_frames")
RUNNERS = ("none", "DirectRunner", "DataflowRunner", "FlinkRunner", "SparkRunner",
           "PortableRunner")


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One input file to ingest (the `formats.Inputs` its reader gets, with one path)."""
    kind: str
    index: int            # position among the source's input files
    path: str             # "" for the embedded dataset, which has no files
    parts_dir: str        # staging folder of the dataset being built
    image_dir: str
    system: str
    clip_frames: int
    clip_stride: int
    image_size: int = 0   # > 0: images validated and stored at most this (shorter side) large

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path,) if self.path else ()

    @property
    def part_name(self) -> str:
        """Named after the input file, not its position: the cache key ignores the order of the
        files, so a rerun listing them otherwise still finds what an earlier run finished."""
        return "part-" + hashlib.sha1(self.path.encode()).hexdigest()[:16]

    @property
    def data_file(self) -> epath.Path:
        return epath.Path(self.parts_dir) / f"{self.part_name}.array_record"

    @property
    def done_file(self) -> epath.Path:
        return epath.Path(self.parts_dir) / f"{self.part_name}.json"


@dataclasses.dataclass(frozen=True)
class ShardResult:
    index: int
    count: int
    skips: dict[str, int]


def _write_atomically(path: epath.Path, write: Callable[[epath.Path], Any]) -> Any:
    """write(tmp) then move tmp over path: readers of `path` see all of it or nothing."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        result = write(tmp)
        tmp.replace(path)  # over a stale file of a run that crashed before its marker
    finally:
        tmp.unlink(missing_ok=True)
    return result


def finished(task: ShardTask) -> ShardResult | None:
    """The result of an earlier run that completed `task`, if any (its json and, when it kept
    records, its shard)."""
    if not task.done_file.exists():
        return None
    done = json.loads(task.done_file.read_text())
    if done["count"] and not task.data_file.exists():
        return None
    return ShardResult(task.index, done["count"], done["skips"])


class ShardIngester:
    """Reads one input file with the source's reader and writes its output shard (a callable,
    so Beam pickles it once per worker with the reader and the features it holds)."""

    def __init__(self, reader: formats.Reader, features: tfds.features.FeaturesDict,
                 on_beam: bool = False):
        self.reader, self.features, self.on_beam = reader, features, on_beam

    def __call__(self, task: ShardTask) -> ShardResult:
        previous = finished(task)
        if previous is not None:
            log.info("shard %d (%s) was ingested by an earlier run", task.index, task.path)
            return previous
        skips: Counter = Counter()
        serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())
        shard_writer = writer_lib.ShardWriter(
            features=self.features, serializer=serializer,
            example_writer=writer_lib.ExampleWriter(file_adapters.FileFormat.ARRAY_RECORD))
        task.data_file.parent.mkdir(parents=True, exist_ok=True)
        examples = self.reader(task, skips)
        if task.image_size:
            examples = fit_images(examples, task.image_size, skips, task.path or "embedded")
        if "://" not in task.parts_dir:
            count = _write_atomically(task.data_file, lambda tmp: shard_writer.write(examples, tmp))
        else:  # ArrayRecord's writer opens local files only: write here, then copy up
            with tempfile.TemporaryDirectory(prefix="emu2_ingest_") as local:
                shard = epath.Path(local) / task.data_file.name
                count = shard_writer.write(examples, shard)
                _write_atomically(task.data_file, shard.copy)
        if not count:  # nothing usable in this file: no empty shard in the dataset
            task.data_file.unlink()
        result = ShardResult(task.index, count, dict(skips))
        _write_atomically(task.done_file, lambda tmp: tmp.write_text(json.dumps(
            {"path": task.path, "count": count, "skips": result.skips})))
        if self.on_beam:
            beam.metrics.Metrics.counter(COUNTER_NAMESPACE, f"{task.kind}/records").inc(count)
            for reason, n in skips.items():
                beam.metrics.Metrics.counter(COUNTER_NAMESPACE, f"{task.kind}/{reason}").inc(n)
        return result


def fit_images(examples: Iterator[tuple[str, dict]], image_size: int, skips: Counter, where: str
               ) -> Iterator[tuple[str, dict]]:
    """`examples` with every image through `images.fit_for_storage` (but those the reader already
    fitted, `formats.FITTED`); a record with an undecodable image is a counted `bad_image` skip."""
    for key, record in examples:
        done = record.pop(formats.FITTED, ())
        try:
            fitted = {name: im.fit_for_storage(value, image_size) for name, value in record.items()
                      if name in IMAGE_FIELDS and name not in done}
            fitted.update({name: [im.fit_for_storage(v, image_size) for v in value]
                           for name, value in record.items() if name in IMAGE_LIST_FIELDS and name not in done})
        except SkipExample as e:
            formats.skip(skips, e.reason, f"{where}:{key}", e.detail)
            continue
        yield key, {**record, **fitted}


def ingest_shards(tasks: Sequence[ShardTask], ingester: ShardIngester, *,
                  beam_runner: Any = None, beam_options: Any = None) -> list[ShardResult]:
    """Runs `ingester` on every task (in this process when there is neither a Beam runner nor
    Beam options, otherwise as one Beam pipeline); the results in task order."""
    if beam_runner is None and beam_options is None:
        return [ingester(task) for task in tasks]
    ingester = copy.copy(ingester)
    ingester.on_beam = True
    pipeline = beam.Pipeline(runner=beam_runner, options=beam_options)
    _ = (pipeline
         | "Shards" >> beam.Create(list(tasks))
         | "Spread" >> beam.Reshuffle()  # one worker per file, not one per bundle of Create
         | "Ingest" >> beam.Map(ingester))
    outcome = pipeline.run()
    outcome.wait_until_finish()
    counters = outcome.metrics().query(
        beam.metrics.MetricsFilter().with_namespace(COUNTER_NAMESPACE))["counters"]
    log.info("beam counters: %s", {c.key.metric.name: c.committed for c in counters})
    results = [finished(task) for task in tasks]
    missing = [task.path for task, result in zip(tasks, results) if result is None]
    if missing:
        raise RuntimeError(f"the Beam run finished without ingesting {missing}")
    return results


def move_into_dataset(tasks: Sequence[ShardTask], results: Sequence[ShardResult],
                      template: naming.ShardedFileTemplate, split: str) -> tfds.core.SplitInfo:
    """Moves the non-empty output shards into the dataset folder under TFDS's shard names (in
    input order) and removes the staging folder; the split's info."""
    kept = [(task, result) for task, result in zip(tasks, results) if result.count]
    template = template.replace(split=split)
    num_bytes = 0
    for shard_index, (task, _) in enumerate(kept):
        target = template.sharded_filepath(shard_index=shard_index, num_shards=len(kept))
        num_bytes += task.data_file.stat().length
        task.data_file.rename(target)
    if tasks:
        epath.Path(tasks[0].parts_dir).rmtree(missing_ok=True)
    return tfds.core.SplitInfo(name=split, shard_lengths=[r.count for _, r in kept],
                               num_bytes=num_bytes, filename_template=template)


def beam_settings(runner: str, num_workers: int = 0, options: Sequence[str] = ()
                  ) -> tuple[Any, Any]:
    """(beam_runner, beam_options) for tfds.download.DownloadConfig from command-line flags; (None,
    None) for the single-process path (`runner='none'`)."""
    if runner == "none":
        if num_workers or options:
            raise ValueError("--num_workers and --beam_option need a Beam --runner")
        return None, None
    if runner not in RUNNERS:
        raise ValueError(f"unknown Beam runner {runner!r}; expected one of {RUNNERS}")
    if runner != "DirectRunner":
        flags = [f"--runner={runner}", *options]
        flags += [f"--num_workers={num_workers}"] if num_workers else []
        return None, beam.options.pipeline_options.PipelineOptions(flags)
    # Beam's DirectRunner would first download and try its Prism binary (which ignores the
    # direct_* options); its Python engine, the FnApiRunner, runs offline and honours them.
    from apache_beam.runners.portability import fn_api_runner  # pylint: disable=import-outside-toplevel
    flags = list(options)
    if num_workers:
        flags += [f"--direct_num_workers={num_workers}", "--direct_running_mode=multi_processing"]
    return fn_api_runner.FnApiRunner(), beam.options.pipeline_options.PipelineOptions(flags)


def shard_tasks(kind: str, paths: Sequence[str], parts_dir: str, **inputs: Any) -> list[ShardTask]:
    """One task per input file (one for a source without files: the embedded dataset)."""
    return [ShardTask(kind, i, path, parts_dir, **inputs)
            for i, path in enumerate(paths or [""])]


def parts_dir_of(data_dir: str) -> str:
    """The staging folder of a dataset folder (a sibling, so TFDS's cleanup leaves it alone)."""
    return os.fspath(data_dir).rstrip("/") + ".parts"
