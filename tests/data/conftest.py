"""Shared fixtures of the data tests: tokenizers, a per-session TFDS cache, small corpus files
in the formats the real datasets ship in, the stages' data configs and finite row packing."""
import importlib
import io
import json
import pathlib
import tarfile
import tempfile
from collections.abc import Iterable, Iterator

import ml_collections
import numpy as np
import pytest
from PIL import Image

from emu2_jax import video_io
from emu2_jax.data import packing
from emu2_jax.data import tokenizer as tk
from emu2_jax.data.assembly import Example

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The Meta-licensed LLaMA tokenizer is never shipped: CI places shared/ next to the clone.
LLAMA_TOKENIZER = REPO_ROOT.parent / "shared" / "llama_tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def tok():
    return tk.load_tokenizer(None)


@pytest.fixture(scope="session")
def llama_tok_path():
    if not LLAMA_TOKENIZER.is_file():
        pytest.skip(f"LLaMA tokenizer not found at {LLAMA_TOKENIZER} (shared/ beside the repo)")
    return LLAMA_TOKENIZER


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One TFDS cache per test session (the embedded dataset builds once, in a tmp dir)."""
    return str(tmp_path_factory.mktemp("tfds_cache"))


def jpeg_bytes(color=(200, 30, 30), size=(40, 30), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: pathlib.Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def write_jsonl(path: pathlib.Path, rows: list) -> str:
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            f.write(b"\n")
    return str(path)


def clip_bytes(num_frames: int, suffix: str = ".mp4", step: int = 20,
               size: tuple[int, int] = (24, 32)) -> bytes:
    """An encoded clip (`video_io.write_video`, PyAV) whose frame i is a flat grey of step * i."""
    frames = np.stack([np.full((*size, 3), step * i, np.uint8) for i in range(num_frames)])
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / f"clip{suffix}"
        video_io.write_video(path, frames)
        return path.read_bytes()


GOOD = jpeg_bytes()
TRUNCATED = GOOD[: len(GOOD) // 2]
GARBAGE = b"this is not an image at all"
NOT_UTF8 = "café".encode("latin-1")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def data_config(stage: str, tiny: bool = True) -> ml_collections.ConfigDict:
    """The data config of configs/<stage>.py (its `:tiny` variant by default)."""
    return importlib.import_module(f"configs.{stage}").get_config("tiny" if tiny else None).data


def iter_rows(examples: Iterable[Example], seq_len: int, max_images: int, image_size: int,
              pad_id: int) -> Iterator[dict[str, np.ndarray]]:
    """Greedy in-order packing of a finite sequence: the `packing.place` logic the input pipeline
    streams with checkpointable state."""
    packer = packing.RowPacker(seq_len, max_images, image_size, pad_id)
    for ex in examples:
        offset = 0
        while offset < len(ex):
            new = packing.place(packer, ex, offset)
            if new == offset or packer.free == 0:
                yield packer.finish()
            offset = new
    if packer.used:
        yield packer.finish()
