"""Ingestion throughput: one process against Apache Beam's DirectRunner with worker processes.

Synthesises, in a temp dir, webdataset shards of image-text pairs (the embedded dataset's photos
upscaled to web-original size, `--source_size` px on their shorter side, and its captions, every
record under its own key) and WebVid-style shards of mp4 clips (a virtual camera over the embedded
photos, `embedded.camera_motion_frames`), then ingests both sources with `sources.prepare_source`
twice into fresh caches, as a LAION-scale run would (`--image_size=448`: every image decoded, bad
ones counted, stored downscaled to the 448 px Emu2 trains at):
  single: in this process (the default path);
  beam:   Beam DirectRunner, `--direct_num_workers=W --direct_running_mode=multi_processing`.
Times are wall clock of the whole ingestion (Beam's worker start-up included). Records/s per
source and for the two together; the last line is `ratio=<beam/single>` of the combined rate.
`--image_size=0` ingests the bytes as they are: then a record costs a tar read and an ArrayRecord
write (thousands per second, I/O-bound), which worker processes on one machine cannot speed up
and Beam's start-up outweighs (its point there is running on many machines).

    python benchmarks/ingest.py [--pairs=4000] [--videos=160] [--shards=16] [--workers=2] \
        [--source_size=768] [--image_size=448]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


CLIP_SIZE = 256  # px: WebVid clips are 336 x 596; the embedded photos are 448 at most


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def synthesise(root: str, pairs: int, videos: int, shards: int, source_size: int) -> tuple[str, str]:
    """Writes pairs-*.tar and videos-*.tar under root; their path patterns."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    from emu2_jax import video_io  # pylint: disable=import-outside-toplevel
    from emu2_jax.data import embedded  # pylint: disable=import-outside-toplevel
    from emu2_jax.data import images as im  # pylint: disable=import-outside-toplevel

    with open(embedded.DIR / "pairs.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    photos = {r["image"]: (embedded.DIR / "images" / r["image"]).read_bytes() for r in rows}
    originals = {name: _upscaled(data, source_size) for name, data in photos.items()}
    motions = ("pan_left", "pan_right", "pan_up", "pan_down", "zoom_in", "zoom_out")
    clips = []
    for i, name in enumerate(sorted(photos)):
        path = os.path.join(root, f"clip-{i}.mp4")
        video_io.write_video(path, np.stack(embedded.camera_motion_frames(
            im.decode_image(photos[name]), motions[i % len(motions)], 24, size=CLIP_SIZE)))
        with open(path, "rb") as f:
            clips.append(f.read())
    for shard in range(shards):
        with tarfile.open(os.path.join(root, f"pairs-{shard:03d}.tar"), "w") as tar:
            for i in range(shard, pairs, shards):
                row = rows[i % len(rows)]
                _add(tar, f"{i:07d}.jpg", originals[row["image"]])
                _add(tar, f"{i:07d}.txt", f"{row['caption']} ({i})".encode())
        with tarfile.open(os.path.join(root, f"videos-{shard:03d}.tar"), "w") as tar:
            for i in range(shard, videos, shards):
                _add(tar, f"{i:07d}.mp4", clips[i % len(clips)])
                _add(tar, f"{i:07d}.txt", f"clip {i}".encode())
    last = f"{shards - 1:03d}"
    return (os.path.join(root, f"pairs-{{000..{last}}}.tar"),
            os.path.join(root, f"videos-{{000..{last}}}.tar"))


def _upscaled(data: bytes, size: int) -> bytes:
    """A JPEG (quality 90) of the photo resized (bicubic) to `size` px on its shorter side."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    with Image.open(io.BytesIO(data)) as image:
        scale = size / min(image.size)
        big = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                          Image.Resampling.BICUBIC)
    out = io.BytesIO()
    big.save(out, format="JPEG", quality=90)
    return out.getvalue()


def ingest(pattern: str, kind: str, cache: str, image_size: int, download_config) -> tuple[int, float]:
    from emu2_jax.data import sources as src  # pylint: disable=import-outside-toplevel
    start = time.perf_counter()
    prepared = src.prepare_source(kind, "webdataset", paths=pattern, data_dir=cache,
                                  image_size=image_size, download_config=download_config)
    return len(prepared.data_source), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000, help="image-text records")
    parser.add_argument("--videos", type=int, default=160, help="mp4 clip records")
    parser.add_argument("--shards", type=int, default=16, help="input shards per source")
    parser.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes")
    parser.add_argument("--source_size", type=int, default=768,
                        help="shorter side of the synthesised originals (px)")
    parser.add_argument("--image_size", type=int, default=448,
                        help="ingestion's --image_size (0: bytes as they are)")
    args = parser.parse_args()

    import logging  # pylint: disable=import-outside-toplevel

    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    from emu2_jax.data import ingest as ing  # pylint: disable=import-outside-toplevel

    logging.getLogger().setLevel(logging.WARNING)  # Beam's workers log every bundle at INFO
    tfds.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="emu2_ingest_") as root:
        start = time.perf_counter()
        patterns = synthesise(root, args.pairs, args.videos, args.shards, args.source_size)
        print(f"corpus: {args.pairs} pairs ({args.source_size} px originals, ingested with "
              f"image_size={args.image_size}) + {args.videos} mp4 clips (24 frames of {CLIP_SIZE} px, 16 "
              f"kept) in {args.shards}+{args.shards} shards, {time.perf_counter() - start:.1f} s "
              f"to write; {os.cpu_count()} CPU cores, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        runner, options = ing.beam_settings("DirectRunner", args.workers)
        modes = {"single": tfds.download.DownloadConfig(),
                 "beam": tfds.download.DownloadConfig(beam_runner=runner, beam_options=options)}
        rates = {}
        for mode, config in modes.items():
            total_records, total_seconds = 0, 0.0
            for pattern, kind in zip(patterns, ("pairs", "videos")):
                records, seconds = ingest(pattern, kind, os.path.join(root, mode), args.image_size, config)
                total_records, total_seconds = total_records + records, total_seconds + seconds
                print(f"{mode:6s} {kind:6s}: {records:6d} records in {seconds:6.2f} s = "
                      f"{records / seconds:8.1f} records/s")
            rates[mode] = total_records / total_seconds
            print(f"{mode:6s} all   : {rates[mode]:8.1f} records/s "
                  f"({'this process' if mode == 'single' else f'{args.workers} workers'})")
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"ratio={rates['beam'] / rates['single']:.2f}")


if __name__ == "__main__":
    main()
