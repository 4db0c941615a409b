"""Per-component parameter counts of a model preset, computed abstractly (no allocation).

    python -m emu2_jax.summary --model=emu2_37b
"""
from __future__ import annotations

import math

import jax
from absl import app, flags
from flax import linen as nn

from emu2_jax.data import layout
from emu2_jax.models import emu2, presets


def abstract_params(config: emu2.Emu2Config) -> dict:
    """Parameter shapes/dtypes of `Emu2Model(config)` via `jax.eval_shape` (nothing allocated)."""
    prompt = layout.abstract(layout.PROMPT, rows=1, seq_len=8, slots=1, image_size=config.vision.image_size)
    model = emu2.Emu2Model(config)
    variables = jax.eval_shape(lambda batch: model.init(jax.random.key(0), batch), prompt)
    return nn.unbox(variables)["params"]


def count_params(tree) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def component_counts(config: emu2.Emu2Config) -> dict[str, int]:
    params = abstract_params(config)
    return {name: count_params(params[name]) for name in emu2.COMPONENTS}


def main(argv):
    del argv
    name = flags.FLAGS.model
    config = presets.get_config(name)
    counts = component_counts(config)
    total = sum(counts.values())
    print(f"model: {name}")
    for name, count in counts.items():
        print(f"  {name:<14} {count:>16,d}  ({100 * count / total:5.2f}%)")
    print(f"  {'total':<14} {total:>16,d}  ({total / 1e9:.3f}B)")
    print(f"total_params={total}")


if __name__ == "__main__":
    # Flags are defined only when run as a command, so importing this module defines none.
    flags.DEFINE_string("model", "tiny", f"one of {sorted(presets.PRESETS)}")
    app.run(main)
