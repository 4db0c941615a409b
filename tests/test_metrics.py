"""The progress line's data part: skip counters appear when non-zero."""
from emu2_jax import metrics

BASE = {"loss": 1.0, "grad_norm": 0.5}


def test_progress_line_shows_nonzero_skips():
    quiet = metrics.progress_line(3, 10, {**BASE, "data/examples": 40, "data/skipped/bad_image": 0,
                                          "data/ingest_skipped/bad_record": 0})
    assert "skipped" not in quiet
    line = metrics.progress_line(3, 10, {**BASE, "data/skipped/bad_image": 3,
                                         "data/skipped/pairs/bad_image": 3,
                                         "data/skipped/too_long": 1, "data/skipped/empty_text": 0,
                                         "data/ingest_skipped/unsafe_path": 2})
    assert line.endswith("| skipped bad_image 3, too_long 1 | ingest skipped unsafe_path 2")


def test_peak_flops_of_device_kinds():
    """Dense bf16 peaks by `jax.Device.device_kind` as JAX spells it (a v5p chip is "TPU v5")."""
    kinds = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12,
             "TPU v5p": 459e12, "TPU v6 lite": 918e12}
    assert {kind: metrics.peak_flops_of_kind(kind) for kind in kinds} == kinds
    assert metrics.peak_flops_of_kind("cpu") is None
    assert metrics.peak_flops_of_kind("NVIDIA GeForce RTX 4090") is None
