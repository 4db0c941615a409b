"""Emu2 training data: tokenizer (tokenizer.py), sequence builders and packing (sequences.py),
pixels (images.py), TFDS ingestion and the embedded dataset (sources.py, embedded/), and the grain
input pipeline (pipeline.py)."""
from emu2_jax.data.pipeline import create_train_iterator, default_data_config
from emu2_jax.data.tokenizer import Tokenizer, caption_prompt, load_tokenizer

__all__ = ["Tokenizer", "caption_prompt", "create_train_iterator", "default_data_config",
           "load_tokenizer"]
