"""The converter's streaming helpers: buffers are reused only once nothing refers to them, and the
torch copies (transposes, casts) equal numpy's bit for bit."""
import ml_dtypes
import numpy as np
import pytest

from emu2_jax.convert import stream


def test_buffers_are_reused_only_when_free():
    buffers = stream.Buffers()
    a = buffers.take((4, 8), np.float32)
    a[:] = 1.0
    b = buffers.take((4, 8), np.float32)  # `a` is alive: a second buffer
    assert not np.shares_memory(a, b) and len(buffers._pool) == 2
    view = a.T  # a view keeps its buffer busy too
    del a
    c = buffers.take((2, 8), np.float32)
    assert not np.shares_memory(c, view) and not np.shares_memory(c, b) and (view == 1.0).all()
    del view, b, c
    d = buffers.take((8, 8), np.int16)  # everything free: fits the smallest free buffer, no new one
    assert len(buffers._pool) == 3 and d.shape == (8, 8) and d.dtype == np.int16
    del d
    e = buffers.take((64, 64), np.float32)  # larger than any: the free small ones are let go
    assert len(buffers._pool) == 1 and e.nbytes == 64 * 64 * 4


@pytest.mark.parametrize("src_dtype,dst_dtype", [(ml_dtypes.bfloat16, ml_dtypes.bfloat16),
                                                 (ml_dtypes.bfloat16, np.float32), (np.float32, ml_dtypes.bfloat16),
                                                 (np.float16, np.float32)])
def test_stored_transposes_and_casts_exactly(src_dtype, dst_dtype):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6 * 4, 10)).astype(src_dtype)       # torch [heads * head_dim, in]
    for value in (weight.T, weight.T.reshape(10, 6, 4), weight.reshape(6, 4, 10).transpose(0, 1, 2)[:, ::1],
                  weight.T.reshape(10, 6, 4).transpose(1, 2, 0)):
        stored = stream._stored(value, np.dtype(dst_dtype), stream.Buffers())
        assert stored.flags.c_contiguous and stored.dtype == np.dtype(dst_dtype)
        expected = np.ascontiguousarray(value.astype(dst_dtype))
        np.testing.assert_array_equal(stored.view(np.uint8), expected.view(np.uint8))


def test_nonfinite_values_are_counted():
    value = np.zeros((300, 7), ml_dtypes.bfloat16)
    assert stream._count_nonfinite(value) == 0
    value[3, 4], value[200, 0], value[299, 6] = np.nan, np.inf, -np.inf
    assert stream._count_nonfinite(value) == 3
    assert stream._count_nonfinite(value.T) == 3
    assert stream._count_nonfinite(np.zeros((0, 3), np.float32)) == 0


def test_source_reads_the_next_layer_tensor_ahead(tmp_path, monkeypatch):
    """Once the order is learned (layer 0, and the step from layer 0 to 1), each tensor is read in the
    read-ahead thread while the one before is handed out, whatever the file order; the values are
    those of the file. A key read out of that order comes back right and the guess is read again."""
    import threading

    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"embed.weight": rng.standard_normal((5, 3)).astype(np.float32)}
    for i in range(4):
        for name in ("q.weight", "norm.bias", "mlp.weight"):
            tensors[f"model.layers.{i}.{name}"] = rng.standard_normal((i + 2, 3)).astype(np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = stream.Source([tmp_path / "model.safetensors"], buffers=stream.Buffers())
    loaded_by: dict[str, str] = {}
    load = source._load

    def recording_load(key):
        loaded_by[key] = threading.current_thread().name
        return load(key)

    monkeypatch.setattr(source, "_load", recording_load)
    order = ["embed.weight"] + [f"model.layers.{i}.{name}" for i in range(4)
                                for name in ("mlp.weight", "q.weight", "norm.bias")]
    for key in order[:-1]:
        np.testing.assert_array_equal(source[key], tensors[key])
    np.testing.assert_array_equal(source["embed.weight"], tensors["embed.weight"])  # out of order
    np.testing.assert_array_equal(source[order[-1]], tensors[order[-1]])
    ahead = {k for k, thread in loaded_by.items() if thread.startswith("read-ahead")}
    assert ahead == set(order[5:-1]), sorted(ahead)  # the last one was guessed, then read again
    assert source.used == set(order) and source.bytes_read == sum(t.nbytes for t in tensors.values())
