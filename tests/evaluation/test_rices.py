"""RICES on constructed features: cosine ranking, most similar last, self-exclusion, ties."""
import math

import numpy as np
import pytest

from emu2_jax.evaluation import rices
from emu2_jax.evaluation.datasets import Example


def _unit(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


SUPPORT = np.array([_unit(0), _unit(10), _unit(50), _unit(90)])


def test_top_k_by_cosine_most_similar_last():
    query = np.array([_unit(0), _unit(85)])
    np.testing.assert_array_equal(rices.rices(query, SUPPORT, 3), [[2, 1, 0], [1, 2, 3]])
    # cosine, not dot product: scaling a support vector changes nothing
    np.testing.assert_array_equal(rices.rices(query, SUPPORT * [[100], [1], [0.01], [7]], 3), [[2, 1, 0], [1, 2, 3]])


def test_query_itself_is_excluded_by_key():
    got = rices.rices(SUPPORT[:1], SUPPORT, 2, query_keys=["b"], support_keys=["a", "b", "c", "d"])
    np.testing.assert_array_equal(got, [[2, 0]])  # without "b" (10 deg): 0 deg, then 50 deg
    with pytest.raises(ValueError, match="--shots=4: the support set has only 3 examples besides the query"):
        rices.rices(SUPPORT[:1], SUPPORT, 4, query_keys=["b"], support_keys=["a", "b", "c", "d"])


def test_ties_rank_the_lower_index_as_more_similar():
    support = np.array([_unit(90), _unit(0), _unit(45), _unit(0)])
    np.testing.assert_array_equal(rices.rices(np.array([_unit(0)]), support, 1), [[1]])
    np.testing.assert_array_equal(rices.rices(np.array([_unit(0)]), support, 2), [[3, 1]])


def test_select_shots_uses_example_features():
    support = [Example(k, features=np.array(_unit(d))) for k, d in zip("abcd", (0, 10, 50, 90))]
    queries = [Example("a", features=np.array(_unit(0))), Example("z", features=np.array(_unit(60)))]
    assert [[e.key for e in shots] for shots in rices.select_shots(queries, support, 2)] == [["c", "b"], ["d", "c"]]
    assert rices.select_shots([Example("q")], support, 0) == [[]]  # zero-shot needs no features
    with pytest.raises(ValueError, match="example 'q' has no features"):
        rices.select_shots([Example("q")], support, 1)
