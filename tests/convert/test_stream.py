"""The converter's writing helpers: buffers are reused only once nothing refers to them, and the
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
