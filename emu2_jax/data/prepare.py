"""Ingests one source into the TFDS cache that training reads (`data.cache_dir`), ahead of
training: in this process (the default, for small data) or as an Apache Beam pipeline that reads
the input files in parallel (the `beam` extra). A failed run resumes at the input files it had
not finished. The last lines say what was written and what was skipped, per reason.

    python -m emu2_jax.data.prepare --kind=pairs --format=webdataset \\
        --paths='DIR/{00000..00009}.tar' --out=CACHE [--runner=DirectRunner --num_workers=2] \\
        [--beam_option=--project=P --beam_option=--region=R ...]
"""
from __future__ import annotations

import json
import time

import tensorflow_datasets as tfds
from absl import app, flags

from emu2_jax.data import ingest
from emu2_jax.data import sources as src

FLAGS = flags.FLAGS
flags.DEFINE_enum("kind", None, src.KINDS, "record kind of the source")
flags.DEFINE_string("format", None, "its on-disk format; per kind: " + "; ".join(
    f"{kind}: {'|'.join(formats)}" for kind, formats in src.FORMATS.items()))
flags.DEFINE_string("paths", "", "input files: globs, {000..009} ranges, folders, comma lists; "
                    "local, file:// or gs://")
flags.DEFINE_string("image_dir", "", "mmc4 / llava / edits / storyboard: where named images are")
flags.DEFINE_string("system", "chat", "llava: 'chat' | 'academic' | a literal system message")
flags.DEFINE_integer("clip_frames", src.CLIP_FRAMES, "video files: frames kept per clip")
flags.DEFINE_integer("clip_stride", 1, "video files: frames sampled among every n-th frame")
flags.DEFINE_integer("image_size", 0, "> 0: decode every image (bad ones are counted skips) and "
                     "store those whose shorter side is larger downscaled to it, as JPEG; 0: as they are")
flags.DEFINE_string("out", "", "TFDS data dir (the training config's data.cache_dir; '' = "
                    f"${src.CACHE_ENV} or {src.DEFAULT_CACHE_DIR})")
flags.DEFINE_enum("runner", "none", ingest.RUNNERS, "Beam runner; 'none': this process")
flags.DEFINE_integer("num_workers", 0, "Beam workers (DirectRunner: processes on this machine; "
                     "other runners: their --num_workers option)")
flags.DEFINE_multi_string("beam_option", [], "a Beam pipeline option, e.g. --project=P")
flags.mark_flags_as_required(["kind", "format"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments {argv[1:]} (quote --paths patterns)")
    try:
        runner, options = ingest.beam_settings(FLAGS.runner, FLAGS.num_workers, FLAGS.beam_option)
        tfds.disable_progress_bar()
        start = time.perf_counter()
        prepared = src.prepare_source(
            FLAGS.kind, FLAGS.format, paths=FLAGS.paths, image_dir=FLAGS.image_dir,
            system=FLAGS.system, data_dir=FLAGS.out, clip_frames=FLAGS.clip_frames,
            clip_stride=FLAGS.clip_stride, image_size=FLAGS.image_size,
            download_config=tfds.download.DownloadConfig(beam_runner=runner, beam_options=options))
    except (ValueError, OSError, ImportError) as e:  # bad input: one line naming it
        raise SystemExit(f"prepare: {e}") from None
    seconds = time.perf_counter() - start
    records = len(prepared.data_source)
    print(f"prepared {records} {FLAGS.kind} records from {prepared.description} in "
          f"{seconds:.1f} s ({records / seconds:.1f} records/s, runner {FLAGS.runner})")
    print(f"dataset: {prepared.data_dir}")
    print(f"ingest_skips={json.dumps(prepared.ingest_skips, sort_keys=True)}")


if __name__ == "__main__":
    app.run(main)
