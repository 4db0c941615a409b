"""Streaming pieces of `python -m emu2_jax.convert`: a lazy reader over checkpoint files and a writer
that puts each converted tensor straight into an Orbax params checkpoint on disk.

`Source` opens every file once (safetensors headers; `.bin` files memory-mapped with
`torch.load(weights_only=True, mmap=True)`) and reads a tensor only when it is asked for, so host
memory holds a few tensors, never the model. (Safetensors data is read with plain reads; the pages
of a memory-mapped `.bin` count towards RSS once read, though the kernel may drop them.) It records
which keys were read, for the final "every source key consumed or ignored" check. Converters read
every layer in the order of the one before, so `Source` learns that order on the first layer and
from then on reads the next tensor in a background thread while the current one is converted: disk
(or page-cache copy) time overlaps the CPU work instead of adding to it.

`ParamsWriter` writes the format `checkpointing.load_params` / `load_pretrained` read: an Orbax
PyTree checkpoint without OCDBT (one zarr array per leaf, named by its '.'-joined path, plus
Orbax's `_METADATA`). Each leaf is a TensorStore array created on its first write; layer-stacked
leaves are chunked one layer per chunk, so writing layer i touches only its own chunk. Everything
goes into `<dst>.tmp-<pid>`, renamed to `dst` only after every leaf is complete: a failed or killed
conversion never leaves anything at `dst`.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import ml_dtypes
import numpy as np

# Orbax's non-OCDBT PyTree layout (orbax-checkpoint 0.11): what `PyTreeCheckpointer(use_ocdbt=False)`
# writes for numpy leaves.
_CHUNK_BYTES = 64 << 20  # unstacked leaves are split along axis 0 into chunks of about this size
_IN_FLIGHT = 2  # pending writes (each holds one converted tensor)
# Uncompressed: trained weights barely compress (zstd-1 saves ~20% of bf16) while compressing
# would double the conversion's CPU time.
CONFIG_FILE = "emu2_jax_model.json"  # the model config next to the arrays (checkpointing.load_pretrained)


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


class Buffers:
    """Byte buffers a conversion reuses for the tensors it reads and transposes.

    A freshly allocated multi-hundred-MB array is new memory: the kernel zeroes every page on first
    touch (and a VM's host may fault it in), which costs several times the copy into it, and freeing
    it hands the pages back. Reading into kept buffers makes reading a tensor cost what copying it
    from the page cache does. A buffer is free again once no array refers to it (no view, no torch
    tensor, no pending TensorStore write), so reuse never overwrites data still in use; the pool
    holds as many buffers as tensors were alive at once, each at most the largest tensor."""

    def __init__(self):
        self._pool: list[np.ndarray] = []
        self._lock = threading.Lock()  # `Source` reads ahead in a thread of its own

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        with self._lock:
            return self._take(shape, np.dtype(dtype))

    def _take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        # Free: referenced only by the pool, the comprehension's variable and getrefcount's argument.
        free = [b for b in self._pool if sys.getrefcount(b) <= 3]
        fitting = [b for b in free if b.size >= nbytes]
        if fitting:
            buffer = min(fitting, key=lambda b: b.size)
        else:  # free buffers too small for this tensor go, so the pool stays (live tensors) x (largest)
            self._pool = [b for b in self._pool if not any(b is f for f in free)]
            buffer = np.empty(max(nbytes, 1), np.uint8)
            self._pool.append(buffer)
        return buffer[:nbytes].view(dtype).reshape(shape)


def _read_safetensor(file: pathlib.Path, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int,
                     buffers: Buffers | None = None) -> np.ndarray:
    out = buffers.take(shape, dtype) if buffers else np.empty(shape, dtype)
    with open(file, "rb", buffering=0) as f:
        f.seek(begin)
        if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
            raise ValueError("file shorter than its header says (truncated)")
    return out


_FLOATS = ("bfloat16", "float16", "float32", "float64")  # every Emu2 / UNet / VAE parameter is one


def _count_nonfinite(tensor: np.ndarray) -> int:
    """NaN/Inf values: found by one min/max pass (torch, NaN-propagating, no temporary: ~10x faster
    than a masked exponent test), counted only when there are some."""
    import torch

    flat = _as_torch(np.ascontiguousarray(tensor)).reshape(-1)
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
    """Lazy `{key: tensor}` over checkpoint files; `get(key)` reads one tensor as numpy."""

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
        if str(tensor.dtype) not in _FLOATS:
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
        if following in self.used or not isinstance(self.where.get(following, (None, {}))[1], tuple):
            return None  # read already, absent, or in a memory-mapped .bin (nothing to overlap)
        return following


class Progress:
    """One line per `every` seconds: tensors and bytes done, GB/s, ETA."""

    def __init__(self, total_tensors: int, total_bytes: int, every: float = 5.0):
        self.total_tensors, self.total_bytes, self.every = total_tensors, total_bytes, every
        self.start = self.last = time.perf_counter()

    def update(self, tensors: int, nbytes: int, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = nbytes / elapsed
        eta = (self.total_bytes - nbytes) / rate if rate else float("inf")
        print(f"convert: {tensors}/{self.total_tensors} tensors, {nbytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, "
              f"{rate / 1e9:.2f} GB/s, ETA {eta:.0f}s", flush=True)


class ParamsWriter:
    """Writes leaves `{path tuple: array}` (whole, or one slot of a layer-stacked leaf) into a
    temporary directory; `commit()` checks completeness and renames it to `dst`."""

    def __init__(self, dst: pathlib.Path, dtype: Any, buffers: Buffers | None = None):
        self.dst, self.buffers = dst, buffers
        self.pending: deque = deque()  # (TensorStore write future, the array it writes)
        self.tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.dtype = np.dtype(dtype)
        self.leaves: dict[tuple[str, ...], Any] = {}
        self.filled: dict[tuple[str, ...], set[int]] = {}
        self.slots: dict[tuple[str, ...], int] = {}

    def _create(self, path: tuple[str, ...], shape: tuple[int, ...], chunks: list[int]) -> Any:
        import tensorstore as ts

        # No fsync per chunk (it halves the write speed): `commit` syncs every file once, before the rename.
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(self.tmp / ".".join(path))},
                "context": {"file_io_sync": False},
                "metadata": {"shape": list(shape), "chunks": chunks, "dtype": _zarr_dtype(self.dtype),
                             "compressor": None, "dimension_separator": "."}}
        return ts.open(spec, create=True).result()

    def write(self, path: tuple[str, ...], value: np.ndarray, slot: int | None = None, slots: int = 0) -> None:
        value = _stored(value, self.dtype, self.buffers)
        if path not in self.leaves:
            if slot is None:
                rows = max(1, _CHUNK_BYTES // max(1, value.nbytes // max(1, value.shape[0] if value.ndim else 1)))
                chunks = [min(value.shape[0], rows), *value.shape[1:]] if value.ndim else []
                self.leaves[path] = self._create(path, value.shape, chunks)
            else:
                self.leaves[path] = self._create(path, (slots, *value.shape), [1, *value.shape])
            self.filled[path], self.slots[path] = set(), slots
        # `value` stays unchanged and referenced (its buffer not reused) until its write is done, so
        # TensorStore may use it without its own copy. Up to _IN_FLIGHT writes go on in TensorStore's
        # threads while the next tensors are read and transposed.
        target = self.leaves[path] if slot is None else self.leaves[path][slot]
        self.pending.append((target.write(value, can_reference_source_data_indefinitely=True), value))
        self.filled[path].add(0 if slot is None else slot)
        while len(self.pending) > _IN_FLIGHT:
            self.pending.popleft()[0].result()

    def flush(self) -> None:
        """Waits for every pending write (raising the first error)."""
        while self.pending:
            self.pending.popleft()[0].result()

    def shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
        """{path: full shape} of the leaves written so far."""
        return {path: tuple(leaf.shape) for path, leaf in self.leaves.items()}

    def commit(self, model_config: dict) -> None:
        self.flush()
        incomplete = [".".join(p) + f" (layers {sorted(set(range(self.slots[p])) - f)})"
                      for p, f in self.filled.items() if self.slots[p] and len(f) != self.slots[p]]
        if incomplete:
            raise ValueError(f"target parameter(s) not filled: {incomplete[:10]}")
        tree = {str(path): {"key_metadata": [{"key": k, "key_type": 2} for k in path],
                            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
                for path in sorted(self.leaves)}
        metadata = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                    "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (self.tmp / "_METADATA").write_text(json.dumps(metadata))
        now = time.time_ns()
        (self.tmp / "_CHECKPOINT_METADATA").write_text(json.dumps(
            {"item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
             "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
             "commit_timestamp_nsecs": now, "custom_metadata": {}}))
        (self.tmp / CONFIG_FILE).write_text(json.dumps(model_config, indent=1))
        (self.tmp / "commit_success.txt").write_text("Checkpoint commit was successful.")
        for file in self.tmp.rglob("*"):  # on disk before the rename makes the checkpoint look complete
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if self.dst.exists():  # --overwrite (checked by the caller): replaced only now, when complete
            shutil.rmtree(self.dst)
        self.tmp.rename(self.dst)

    def abort(self) -> None:
        for future, _ in self.pending:  # nothing may still be writing into the folder being removed
            with contextlib.suppress(Exception):  # the conversion is failing already: its error is raised
                future.result()
        self.pending.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as numpy without a copy; bfloat16 as ml_dtypes' bfloat16 (numpy has none)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


_BITS = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _as_torch(value: np.ndarray, *, raw: bool = False) -> Any:
    """A torch view of `value`: of its raw bits (`raw`, any dtype), else of its floats (bfloat16
    through its int16 bits: torch cannot take ml_dtypes arrays)."""
    import torch

    with warnings.catch_warnings():  # a read-only view (restored params) is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        if raw:
            return torch.from_numpy(value.view(_BITS[value.dtype.itemsize]))
        if str(value.dtype) == "bfloat16":
            return torch.from_numpy(value.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(value)


def _stored(value: np.ndarray, dtype: Any, buffers: Buffers | None = None) -> np.ndarray:
    """`value` C-contiguous in `dtype`: itself when it already is, else copied by torch (multithreaded,
    casting floats on the way; twice as fast as numpy's strided copy for these large 2-byte
    transposes, the bulk of a conversion's CPU time) into a buffer of `buffers` (or a new array)."""
    dtype = np.dtype(dtype)
    if value.flags.c_contiguous and value.dtype == dtype:
        return value
    same = value.dtype == dtype
    if min(value.strides, default=0) < 0 or not (same or {str(value.dtype), str(dtype)} <= set(_FLOATS)):
        return np.ascontiguousarray(value).astype(dtype, copy=False)
    out = buffers.take(value.shape, dtype) if buffers else np.empty(value.shape, dtype)
    source = _coalesced(value)  # e.g. [in, heads, head_dim] of a transposed [heads * head_dim, in]: 2D
    _as_torch(out.reshape(source.shape), raw=same).copy_(_as_torch(source, raw=same))
    return out


def _coalesced(value: np.ndarray) -> np.ndarray:
    """`value` with each pair of adjacent axes that step through memory as one axis merged: the same
    elements in the same order, in fewer dimensions (torch copies a 2D transpose 3x faster than the
    same transpose seen as 3D)."""
    shape, strides = [value.shape[0]], [value.strides[0]]
    for size, stride in zip(value.shape[1:], value.strides[1:]):
        if strides[-1] == size * stride:
            shape[-1], strides[-1] = shape[-1] * size, stride
        else:
            shape.append(size)
            strides.append(stride)
    return np.lib.stride_tricks.as_strided(value, shape, strides, writeable=False)


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if str(dtype) == "bfloat16" else dtype.str
