"""`python -m emu2_jax.summary`: abstract parameter counts."""
import subprocess
import sys

import jax
import numpy as np
from flax import linen as nn

from emu2_jax import summary
from emu2_jax.models import emu2, presets

# SPEC.md headline: the released Emu2 (vocab 32272) has 36,906,513,152 parameters.
EMU2_PARAMS = {"visual": 4_350_093_568, "llm": 32_532_564_480, "projections": 23_855_104}
EMU2_TOTAL = 36_906_513_152


def test_tiny_abstract_count_equals_materialised_params():
    config = presets.get_config("tiny")
    abstract = summary.abstract_params(config)
    batch = {k: np.asarray(v) for k, v in jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), {
        "tokens": jax.ShapeDtypeStruct((1, 8), np.int32), "positions": jax.ShapeDtypeStruct((1, 8), np.int32),
        "segment_ids": jax.ShapeDtypeStruct((1, 8), np.int32),
        "images": jax.ShapeDtypeStruct((1, 1, 56, 3 * 56), np.uint8),
        "image_valid": jax.ShapeDtypeStruct((1, 1), bool), "image_is_frame": jax.ShapeDtypeStruct((1, 1), bool),
    }).items()}
    real = nn.unbox(emu2.Emu2Model(config).init(jax.random.key(0), batch))["params"]
    assert summary.count_params(abstract) == summary.count_params(real)


def test_emu2_37b_matches_released_checkpoint_count():
    counts = summary.component_counts(presets.get_config("emu2_37b"))
    assert counts["visual"] == EMU2_PARAMS["visual"]
    assert counts["llm"] == EMU2_PARAMS["llm"]
    assert counts["connector"] + counts["project_down"] == EMU2_PARAMS["projections"]
    assert sum(counts.values()) == EMU2_TOTAL


def test_summary_cli_prints_total_line():
    out = subprocess.run([sys.executable, "-m", "emu2_jax.summary", "--model=emu1_14b"], check=True,
                         capture_output=True, text=True).stdout
    last = out.strip().splitlines()[-1]
    assert last.startswith("total_params=")
    total = int(last.split("=")[1])
    assert 13.5e9 < total < 15e9, total  # Emu v1 is "14B"


def test_medium_count_is_the_documented_one():
    """docs/model.md's presets table and the README give these counts."""
    counts = summary.component_counts(presets.get_config("medium"))
    assert counts == {"visual": 303_152_128, "connector": 2_097_152, "llm": 1_365_411_840, "project_down": 2_097_152}
    assert sum(counts.values()) == 1_672_758_272
