"""Emu2 training data, bottom up: tokenizer (tokenizer.py), pixels (images.py), the batch layout
(layout.py); format readers (formats.py), the embedded dataset (embedded/) and the TFDS sources
built from them (sources.py); sequences from pieces (assembly.py), one builder per data type
(sequences.py), record -> Example (records.py), row packing (packing.py); and the grain input
pipeline (pipeline.py). The data mixtures are in the stage configs (configs/<stage>.py)."""
import importlib
from typing import Any

# Resolved on first use, so that the ingestion modules (what a Beam worker imports) do not
# pull in the input pipeline's grain and JAX.
_EXPORTS = {"create_train_iterator": "pipeline", "Tokenizer": "tokenizer",
            "caption_prompt": "tokenizer", "load_tokenizer": "tokenizer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
