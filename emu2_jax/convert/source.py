"""The reading side of `python -m emu2_jax.convert`: `Source`, a lazy `{key: tensor}` over checkpoint files.

`Source` opens every file once (safetensors headers; `.bin` files memory-mapped with
`torch.load(weights_only=True, mmap=True)`) and reads a tensor only when it is asked for, so host
memory holds a few tensors, never the model. (Safetensors data is read with plain reads; the pages
of a memory-mapped `.bin` count towards RSS once read, though the kernel may drop them.) It records
which keys were read, for the final "every source key consumed or ignored" check. Converters read
every layer in the order of the one before, so `Source` learns that order on the first layer and
from then on reads the next tensor in a background thread while the current one is converted: disk
(or page-cache copy) time overlaps the CPU work instead of adding to it.
"""
from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import ml_dtypes
import numpy as np

from emu2_jax.convert.stream import FLOAT_DTYPES, Buffers, as_torch


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def source_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of a checkpoint file or folder: the shards its `*.index.json` names (each must
    exist), else every `.safetensors` file, else every `.bin` / `.pt` file."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    indexes = sorted(path.glob("*.index*.json"))  # `.index.bf16.json` with a variant
    if indexes:
        files: list[pathlib.Path] = []
        for index in indexes:
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{index}: not a weight index ({_first_line(e)})") from None
            for name in sorted(set(weight_map.values())):
                if not (path / name).is_file():
                    raise FileNotFoundError(f"{index}: names shard {name}, which is not in {path}")
                files.append(path / name)
        return files
    files = sorted(path.glob("*.safetensors")) or sorted([*path.glob("*.bin"), *path.glob("*.pt")])
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors, .bin or .pt files")
    return files


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _safetensors_header(file: pathlib.Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
    """{key: (dtype, shape, begin, end)} with absolute byte offsets, checked against the file's size.

    Read directly rather than through `safe_open`, whose memory map keeps every page read resident:
    the converter's RSS would grow to the checkpoint's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length <= 0 or 8 + length > size:
            raise ValueError(f"header length {length} does not fit in the file's {size} bytes")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    entries = {}
    for key, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key!r} has unsupported dtype {info['dtype']}")
        dtype, shape = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
        begin, end = (8 + length + offset for offset in info["data_offsets"])
        if end - begin != int(np.prod(shape)) * dtype.itemsize or end > size:
            raise ValueError(f"tensor {key!r} ends at byte {end}, past the end of the file ({size} bytes): truncated"
                             if end > size else f"tensor {key!r}: byte range does not match its shape {shape}")
        entries[key] = (dtype, shape, begin, end)
    return entries


def _read_safetensor(file: pathlib.Path, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int,
                     buffers: Buffers | None = None) -> np.ndarray:
    out = buffers.take(shape, dtype) if buffers else np.empty(shape, dtype)
    with open(file, "rb", buffering=0) as f:
        f.seek(begin)
        if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
            raise ValueError("file shorter than its header says (truncated)")
    return out


def _count_nonfinite(tensor: np.ndarray) -> int:
    """NaN/Inf values: found by one min/max pass (torch, NaN-propagating, no temporary: ~10x faster
    than a masked exponent test), counted only when there are some."""
    import torch

    flat = as_torch(np.ascontiguousarray(tensor)).reshape(-1)
    if flat.numel() == 0:
        return 0
    low, high = torch.aminmax(flat)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return 0
    return int((~torch.isfinite(flat)).sum())


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_pattern(key: str) -> tuple[tuple[str, str], int | None]:
    """`key` split around its first index: (('model.layers', 'mlp.up_proj.weight'), 3); ((key, ''), None)."""
    match = _LAYER_INDEX.search(key)
    if match is None:
        return (key, ""), None
    return (key[:match.start()], key[match.end():]), int(match.group(1))


class Source:
    """Lazy `{key: tensor}` over checkpoint files; `source[key]` reads one tensor as numpy."""

    def __init__(self, files: list[pathlib.Path], *, allow_nonfinite: bool = False,
                 buffers: Buffers | None = None):
        self.allow_nonfinite, self.buffers = allow_nonfinite, buffers
        self.where: dict[str, tuple[pathlib.Path, Any]] = {}  # key -> (file, open handle)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.nbytes: dict[str, int] = {}
        self.used: set[str] = set()
        self.ignored: set[str] = set()  # present, deliberately not converted (inv_freq, safety checker, ...)
        self.bytes_read = 0
        # Read-ahead: the key read after each key pattern, learned on the first layer (_next_key).
        self._after: dict[tuple[str, str], tuple[tuple[str, str], int | None]] = {}
        self._last: tuple[tuple[str, str], int | None] | None = None
        self._ahead: tuple[str, futures.Future] | None = None
        self._reader = futures.ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        for file in files:
            self._open(file)

    def _open(self, file: pathlib.Path) -> None:
        try:
            if file.name.endswith(".safetensors"):
                for key, (dtype, shape, begin, end) in _safetensors_header(file).items():
                    self._add(file, (dtype, shape, begin, end), key, shape, end - begin)
                return
            import torch  # convert-only dependency

            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # safetensors' and torch's errors do not say which file
            raise ValueError(f"{file}: cannot read it ({_first_line(e)})") from e
        if not isinstance(state, dict):
            raise ValueError(f"{file}: holds a {type(state).__name__}, not a dict of tensors")
        if isinstance(state.get("module"), dict):  # DeepSpeed's model states (Emu v1's Emu-pretrain.pt)
            state = state["module"]  # the other entries (step counts, ds_config, ...) are not weights
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):  # weights_only still unpickles plain values
                raise ValueError(f"{file}: {key!r} is a {type(value).__name__}, not a tensor")
            self._add(file, state, key, tuple(value.shape), value.numel() * value.element_size())

    def _add(self, file: pathlib.Path, handle: Any, key: str, shape: tuple[int, ...], nbytes: int) -> None:
        if key in self.where:
            raise ValueError(f"{file}: key {key!r} is also in {self.where[key][0]}")
        self.where[key], self.shapes[key], self.nbytes[key] = (file, handle), shape, nbytes

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: object) -> bool:
        return key in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, key: str) -> np.ndarray:
        """The tensor as float32 / its own numpy dtype (bfloat16 stays ml_dtypes.bfloat16)."""
        ahead, self._ahead = self._ahead, None  # a wrong guess is dropped (its buffer freed once read)
        tensor = ahead[1].result() if ahead and ahead[0] == key else self._load(key)
        if key not in self.used:
            self.used.add(key)
            self.bytes_read += self.nbytes[key]
        following = self._next_key(key)
        if following is not None:
            self._ahead = following, self._reader.submit(self._load, following)
        return tensor

    def _load(self, key: str) -> np.ndarray:
        file, handle = self.where[key]
        try:
            tensor = (_numpy(handle[key]) if isinstance(handle, dict)
                      else _read_safetensor(file, *handle, buffers=self.buffers))
        except Exception as e:
            raise ValueError(f"{file}: cannot read tensor {key!r} ({_first_line(e)})") from e
        if str(tensor.dtype) not in FLOAT_DTYPES:
            raise ValueError(f"{file}: tensor {key!r} has dtype {tensor.dtype}, not a float type")
        if not self.allow_nonfinite:
            bad = _count_nonfinite(tensor)
            if bad:
                raise ValueError(f"{file}: tensor {key!r} holds {bad} NaN/Inf value(s) of {tensor.size}; pass "
                                 f"--allow_nonfinite to convert anyway")
        return tensor

    def _next_key(self, key: str) -> str | None:
        """The unread safetensors key expected after `key`, from the order the previous layer was read
        in: after `layers.{i}.x` comes `layers.{i+d}.y` when `layers.{j+d}.y` came after `layers.{j}.x`."""
        pattern, index = _layer_pattern(key)
        if self._last is not None:
            last_pattern, last_index = self._last
            indexed = index is not None and last_index is not None
            self._after[last_pattern] = (pattern, index - last_index) if indexed else ((key, ""), None)
        self._last = pattern, index
        (prefix, suffix), step = self._after.get(pattern, ((None, ""), None))
        if prefix is None or (step is not None and index is None):
            return None
        following = prefix if step is None else f"{prefix}.{index + step}.{suffix}"
        if following in self.used or following not in self.where:
            return None
        return following if isinstance(self.where[following][1], tuple) else None  # a .bin is memory-mapped


def _numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as numpy without a copy; bfloat16 as ml_dtypes' bfloat16 (numpy has none)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
