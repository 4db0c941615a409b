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
