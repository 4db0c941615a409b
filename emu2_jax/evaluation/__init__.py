"""Evaluation library of the papers' benchmarks: metrics, data readers, prompts, RICES few-shot selection.

`metrics` (official metric definitions), `datasets` (the benchmarks' standard files -> `Example`s, and
the embedded evaluation set), `prompts` (the papers' prompts), `rices` (retrieval of in-context
examples) run no model; `media` (images, clips, the encoder's pooled features) and `run` (one task on a
loaded model: shots, answers or scores, the metric) do. `python -m emu2_jax.evaluate` is the command.
"""
