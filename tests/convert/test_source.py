"""The converter's reader: NaN/Inf counting and reading the next layer's tensor ahead."""
import ml_dtypes
import numpy as np

from emu2_jax.convert import source, stream


def test_nonfinite_values_are_counted():
    value = np.zeros((300, 7), ml_dtypes.bfloat16)
    assert source._count_nonfinite(value) == 0
    value[3, 4], value[200, 0], value[299, 6] = np.nan, np.inf, -np.inf
    assert source._count_nonfinite(value) == 3
    assert source._count_nonfinite(value.T) == 3
    assert source._count_nonfinite(np.zeros((0, 3), np.float32)) == 0


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
    reader = source.Source([tmp_path / "model.safetensors"], buffers=stream.Buffers())
    loaded_by: dict[str, str] = {}
    load = reader._load

    def recording_load(key):
        loaded_by[key] = threading.current_thread().name
        return load(key)

    monkeypatch.setattr(reader, "_load", recording_load)
    order = ["embed.weight"] + [f"model.layers.{i}.{name}" for i in range(4)
                                for name in ("mlp.weight", "q.weight", "norm.bias")]
    for key in order[:-1]:
        np.testing.assert_array_equal(reader[key], tensors[key])
    np.testing.assert_array_equal(reader["embed.weight"], tensors["embed.weight"])  # out of order
    np.testing.assert_array_equal(reader[order[-1]], tensors[order[-1]])
    ahead = {k for k, thread in loaded_by.items() if thread.startswith("read-ahead")}
    assert ahead == set(order[5:-1]), sorted(ahead)  # the last one was guessed, then read again
    assert reader.used == set(order) and reader.bytes_read == sum(t.nbytes for t in tensors.values())
