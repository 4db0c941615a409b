"""Evaluation library of the papers' benchmarks: metrics, data readers, prompts, RICES few-shot selection.

`metrics` (official metric definitions), `datasets` (the benchmarks' standard files -> `Example`s, and
the embedded evaluation set), `prompts` (the papers' prompts), `rices` (retrieval of in-context
examples). Nothing here imports torch or runs a model; `emu2_jax.evaluate` drives them.
"""
