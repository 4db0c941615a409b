"""What a training run reports: the progress line, TensorBoard scalars, throughput and MFU.

TensorBoard event files are written by `SummaryWriter`, a small writer of our own (TensorFlow is
not a dependency, and `flax.metrics.tensorboard` needs it): TFRecord framing with masked CRC32C
around hand-encoded `Event` protos holding `simple_value` scalars, which TensorBoard reads as is.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Mapping, Sequence

import jax

from emu2_jax.models.emu2 import Emu2Config

# ---------------------------------------------------------------------------------------------
# TensorBoard event files.


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord files."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the payload, its masked CRC (little endian)."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_proto(wall_time: float, step: int, *, file_version: str | None = None,
                scalars: Mapping[str, float] | None = None) -> bytes:
    """A serialized tensorflow `Event` (wall_time=1, step=2, file_version=3, summary=5)."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        # Summary.value (1) = Value{tag (1), simple_value (2, float32)}.
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _field_bytes(5, values)
    return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes):
    """(field number, value) of a serialized proto: ints, doubles/floats as bytes, nested as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def read_scalars(path: str) -> list[tuple[int, dict[str, float]]]:
    """(step, {tag: value}) of every scalar event in an event file, checking each record's CRCs."""
    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], 0
    while pos < len(data):
        header, (length_crc,) = data[pos:pos + 8], struct.unpack("<I", data[pos + 8:pos + 12])
        (length,) = struct.unpack("<Q", header)
        payload = data[pos + 12:pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
        if length_crc != _masked_crc(header) or payload_crc != _masked_crc(payload):
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += 16 + length
        step, scalars = 0, {}
        for number, value in _fields(payload):
            if number == 2:
                step = value
            elif number == 5:
                for _, summary_value in _fields(value):
                    fields = dict(_fields(summary_value))
                    if 2 in fields:
                        scalars[fields[1].decode()] = struct.unpack("<f", fields[2])[0]
        if scalars:
            out.append((step, scalars))
    return out


class SummaryWriter:
    """Appends scalar summaries to `<logdir>/events.out.tfevents.<time>.<host>`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(event_proto(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._file.write(tfrecord(event_proto(time.time(), step, scalars=values)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU.

# Dense bf16 peak FLOP/s per device, matched against `jax.Device.device_kind`.
_PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """The device's dense bf16 peak, or None when unknown (e.g. CPU: no MFU is shown)."""
    kind = (device or jax.devices()[0]).device_kind
    return next((flops for name, flops in _PEAK_FLOPS if name.lower() in kind.lower()), None)


def _multiplier(trained: bool, backprop_through: bool) -> int:
    """Passes of a tower's forward cost: 1 forward, +2 when its weights train (gradients w.r.t.
    activations and weights), +1 when only gradients must flow through it to earlier weights."""
    return 1 + (2 if trained else int(backprop_through))


def training_flops(config: Emu2Config, *, tokens: int, seq_len: float, images: int,
                   trainable: Sequence[str], lora: bool = False) -> float:
    """Matmul FLOPs of one optimizer step (2 per multiply-add), as used for MFU.

    tokens: LLM positions processed (padding included); seq_len: keys each query attends on average
    (seq_len / 2 for causal attention, the convention of the tasks and `aot`); images: encoder passes
    (stills and frames).
    A frozen encoder runs forward only; a frozen LLM still back-propagates when LoRA adapters or
    anything before it train. The small connector and LoRA matmuls are left out.
    """
    llm, vision = config.llm, config.vision
    attn = llm.hidden_size * llm.head_dim * (2 * llm.num_heads + 2 * llm.num_kv_heads)
    llm_params = llm.num_layers * (attn + 3 * llm.hidden_size * llm.intermediate_size)
    llm_forward = tokens * (2 * (llm_params + llm.hidden_size * llm.vocab_size)
                            + 4 * llm.num_layers * seq_len * llm.num_heads * llm.head_dim)
    v_tokens = vision.num_patches + 1
    vit_params = vision.depth * (4 * vision.width ** 2 + 2 * vision.width * vision.mlp_dim)
    vit_forward = images * (2 * v_tokens * vit_params + 4 * vision.depth * v_tokens ** 2 * vision.width
                            + 2 * vision.num_patches * vision.patch_size ** 2 * 3 * vision.width)
    llm_trained = "llm" in trainable and not lora
    llm_mult = _multiplier(llm_trained, backprop_through=lora or bool({"visual", "connector"} & set(trainable)))
    vit_mult = _multiplier("visual" in trainable, backprop_through=False)
    return float(llm_forward * llm_mult + vit_forward * vit_mult)


# ---------------------------------------------------------------------------------------------
# The progress line.


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Throughput:
    """Rates over the steps since the last report; call `report` at each log step."""

    def __init__(self, start_step: int, total_steps: int, flops_per_step: float, peak_flops: float | None):
        self._total = total_steps
        self._flops = flops_per_step
        self._peak = peak_flops
        self._last_step, self._last_time = start_step, time.perf_counter()

    def report(self, step: int, tokens: float, images: float) -> dict[str, float]:
        """tokens, images: summed over the steps since the last report (all hosts)."""
        now = time.perf_counter()
        seconds = max(now - self._last_time, 1e-9)
        steps = max(step - self._last_step, 1)
        self._last_step, self._last_time = step, now
        out = {
            "steps_per_sec": steps / seconds,
            "tokens_per_sec": tokens / seconds,
            "images_per_sec": images / seconds,
            "eta_seconds": (self._total - step) * seconds / steps,
        }
        if self._peak:
            out["mfu"] = self._flops * steps / seconds / (self._peak * jax.device_count())
        return out


def progress_line(step: int, total_steps: int, values: Mapping[str, float]) -> str:
    """`step 120/1000 | loss 2.31 (text 2.31, image 0.00, acc 0.41) | lr llm 3.00e-05 ... | ETA 4m10s`;
    the throughput parts appear when `values` has them (not for the first, compiling step)."""
    loss = f"loss {values['loss']:.4f}"
    if "text_loss" in values:  # the LLM stages; the decoder stage's loss is the denoising MSE alone
        loss += (f" (text {values['text_loss']:.4f}, image {values['image_loss']:.4f}, "
                 f"acc {values['text_accuracy']:.3f})")
    elif "cond_dropped" in values:
        loss += f" (condition dropped {100 * values['cond_dropped']:.0f}%)"
    parts = [f"step {step}/{total_steps}", loss]
    lrs = " ".join(f"{k[3:]} {v:.2e}" for k, v in values.items() if k.startswith("lr/"))
    if lrs:
        parts.append(f"lr {lrs}")
    parts.append(f"grad_norm {values['grad_norm']:.3f}")
    if "tokens_per_sec" in values:
        tokens = f"{values['tokens_per_sec']:.0f} tok/s, " if values["tokens_per_sec"] else ""
        parts.append(f"{tokens}{values['images_per_sec']:.1f} img/s")
        parts.append(f"MFU {100 * values['mfu']:.1f}%" if "mfu" in values else "MFU n/a")
        parts.append(f"ETA {format_duration(values['eta_seconds'])}")
    if values.get("nonfinite"):
        parts.append(f"{values['nonfinite']:.0f} non-finite step(s) skipped")
    return " | ".join(parts)
