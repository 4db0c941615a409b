"""A tiny random Emu2 with the embedded tokenizer, and two embedded photos: fixtures of the inference tests."""
import jax
import numpy as np
import pytest
from flax import linen as nn

from emu2_jax.data import layout
from emu2_jax.data import tokenizer as tk
from emu2_jax.models import emu2, presets


@pytest.fixture(scope="session")
def tiny_emu2():
    config = presets.tiny()
    model = emu2.Emu2Model(config)
    dummy = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), layout.abstract(
        layout.LLM, rows=1, seq_len=8, slots=1, image_size=config.vision.image_size))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), dummy))["params"]
    tokenizer = tk.tokenizer_for_vocab(None, config.llm.vocab_size)
    return model, params, tokenizer


@pytest.fixture(scope="session")
def photos():
    """Two embedded photos, uint8."""
    from emu2_jax.data import images as image_lib

    names = sorted((tk.EMBEDDED_DIR / "images").iterdir())[:2]
    return [image_lib.decode_image(p.read_bytes()) for p in names]
