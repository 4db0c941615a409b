"""RICES, Retrieval In-Context Example Selection (Yang et al. 2022), the few-shot selection of Flamingo,
Emu and Emu2: a query's shots are the support examples whose visual features (the encoder's pooled
features; for videos the mean over frames) are most cosine-similar to the query's. As in open_flamingo,
the shots are ordered from least to most similar, so that the most similar one sits next to the query.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emu2_jax.evaluation.datasets import Example
from emu2_jax.evaluation.metrics import l2_normalize


def rices(query_features: np.ndarray, support_features: np.ndarray, k: int, *,
          query_keys: Sequence[str] | None = None, support_keys: Sequence[str] | None = None) -> np.ndarray:
    """[Q, k] support indices: per query its k most similar support examples, most similar last. Equal
    similarities rank the lower support index as more similar (deterministic). With keys, a support
    example sharing the query's key (the query itself, when the support set contains it) is never picked."""
    q, s = np.asarray(query_features), np.asarray(support_features)
    if q.ndim != 2 or s.ndim != 2 or q.shape[1] != s.shape[1]:
        raise ValueError(f"rices: want features [Q, D] and [S, D], got {q.shape} and {s.shape}")
    sim = l2_normalize(q) @ l2_normalize(s).T
    excluded = np.zeros(sim.shape, bool)
    if query_keys is not None and support_keys is not None:
        excluded = np.asarray(query_keys, object)[:, None] == np.asarray(support_keys, object)[None, :]
    available = s.shape[0] - (excluded.sum(axis=1).max() if q.shape[0] else 0)
    if k > available:
        raise ValueError(f"--shots={k}: the support set has only {available} examples besides the query")
    order = np.argsort(np.where(excluded, np.inf, -sim), axis=1, kind="stable")
    return order[:, :k][:, ::-1]


def select_shots(queries: Sequence[Example], support: Sequence[Example], k: int) -> list[list[Example]]:
    """The RICES shots of each query, from the `features` the caller set on every example."""
    if k == 0 or not queries:
        return [[] for _ in queries]
    if len(support) < k:
        raise ValueError(f"--shots={k}: the support set has only {len(support)} examples")
    missing = next((e.key for e in [*queries, *support] if e.features is None), None)
    if missing is not None:
        raise ValueError(f"select_shots: example {missing!r} has no features")
    index = rices(np.stack([e.features for e in queries]), np.stack([e.features for e in support]), k,
                  query_keys=[e.key for e in queries], support_keys=[e.key for e in support])
    return [[support[j] for j in row] for row in index]
