"""Running Emu2 / Emu: text generation, image-embedding regression and image decoding, prompts,
checkpoint loading (docs/inference.md)."""
