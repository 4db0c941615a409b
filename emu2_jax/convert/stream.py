"""The writing side of `python -m emu2_jax.convert` (the reading side is `convert.source`): a writer
that puts each converted tensor straight into an Orbax params checkpoint on disk, the buffers both
sides reuse, and progress lines.

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
import shutil
import sys
import threading
import time
import warnings
from collections import deque
from typing import Any

import numpy as np

# Orbax's non-OCDBT PyTree layout (orbax-checkpoint 0.11): what `PyTreeCheckpointer(use_ocdbt=False)`
# writes for numpy leaves.
_CHUNK_BYTES = 64 << 20  # unstacked leaves are split along axis 0 into chunks of about this size
_IN_FLIGHT = 2  # pending writes (each holds one converted tensor)
# Uncompressed: trained weights barely compress (zstd-1 saves ~20% of bf16) while compressing
# would double the conversion's CPU time.
CONFIG_FILE = "emu2_jax_model.json"  # the model config next to the arrays (checkpointing.load_pretrained)
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")  # every Emu2 / UNet / VAE parameter is one


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


_BITS = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def as_torch(value: np.ndarray, *, raw: bool = False) -> Any:
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
    if min(value.strides, default=0) < 0 or not (same or {str(value.dtype), str(dtype)} <= set(FLOAT_DTYPES)):
        return np.ascontiguousarray(value).astype(dtype, copy=False)
    out = buffers.take(value.shape, dtype) if buffers else np.empty(value.shape, dtype)
    source = _coalesced(value)  # e.g. [in, heads, head_dim] of a transposed [heads * head_dim, in]: 2D
    as_torch(out.reshape(source.shape), raw=same).copy_(as_torch(source, raw=same))
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
