"""Emu2 training data, bottom up: tokenizer (tokenizer.py), pixels (images.py), the batch layout
(layout.py); format readers (formats.py), the embedded dataset (embedded/) and the TFDS sources
built from them (sources.py); sequences from pieces (assembly.py), one builder per data type
(sequences.py), record -> Example (records.py), row packing (packing.py); and the grain input
pipeline (pipeline.py). The data mixtures are in the stage configs (configs/<stage>.py)."""
from emu2_jax.data.pipeline import create_train_iterator
from emu2_jax.data.tokenizer import Tokenizer, caption_prompt, load_tokenizer

__all__ = ["Tokenizer", "caption_prompt", "create_train_iterator", "load_tokenizer"]
