"""Metrics against worked examples of their official definitions (vqaEval.py, coco-caption CIDEr-D,
Mann-Whitney ROC AUC), and CIDEr-D parity with pycocoevalcap."""
import math

import numpy as np
import pytest

from emu2_jax.evaluation import metrics as m


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, expected):
    # m matching answers: m subsets lose a match (min(1, (m-1)/3)), 10-m keep all m (min(1, m/3)).
    # m=1: 9/3/10 = 0.3; m=2: (2/3 + 8*2/3)/10 = 0.6; m=3: (3*2/3 + 7)/10 = 0.9; m=4: 1.
    answers = ["cat"] * matches + [f"other{i}" for i in range(10 - matches)]
    assert m.vqa_accuracy("cat", answers) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [
    ("yes, it is", "yes it is"),  # a mark touching a space is deleted
    ("black/white", "black white"),  # otherwise it becomes a space
    ("1,000 (approx)", "1000 approx"),  # a digit,digit anywhere: every mark is deleted
    ("the end.", "the end"),  # periods not followed by a digit go
    ("2.5", "2.5"),
])
def test_process_punctuation(text, expected):
    assert m.process_punctuation(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The Two dogs", "2 dogs"), ("an apple", "apple"), ("dont know", "don't know"), ("none", "0"),
    ("Im here", "im here"),  # capitalised contraction keys never match: words are lowercased first
])
def test_process_digit_article(text, expected):
    assert m.process_digit_article(text) == expected


def test_vqa_normalisation_of_prediction_and_answers():
    assert m.normalize_answer("  Two.\n") == "2"
    assert m.vqa_accuracy("Two.", ["2"] * 10) == 1.0  # the prediction is always normalised
    # the answers only get processPunctuation, and only when they disagree: "t-shirt" -> "t shirt"
    assert m.vqa_accuracy("t shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    assert m.vqa_accuracy("t shirt", ["t-shirt"] * 10) == 0.0
    with pytest.raises(ValueError, match="no human answers"):
        m.vqa_accuracy("cat", [])


def test_exact_match():
    assert m.exact_match("The dog.", "dog") == 1.0
    assert m.exact_match(" Two\n", "2") == 1.0
    assert m.exact_match("dogs", "dog") == 0.0


def test_cider_d_worked_examples():
    # Two keys: idf = log(2) - log(1) for every reference n-gram. A two-word caption equal to its
    # reference has cosine 1 for unigrams and bigrams and no 3/4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    score, per_key = m.cider_d({"a": "red bus", "b": "green tree"}, {"a": ["red bus"], "b": ["green tree"]})
    assert per_key == pytest.approx({"a": 5.0, "b": 5.0}) and score == pytest.approx(5.0)
    # "red red" vs "red bus": unigram weights (2w) vs (w, w); clipped: min(2w, w) * w / (2w * sqrt(2) w)
    # = 1 / (2 sqrt 2); the bigram (red, red) is absent from the reference; equal lengths, no penalty.
    _, per_key = m.cider_d({"a": "red red", "b": "green tree"}, {"a": ["red bus"], "b": ["green tree"]})
    assert per_key["a"] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4)
    # one key: every idf is log(1) - log(1) = 0
    assert m.cider_d({"a": "red bus"}, {"a": ["red bus"]})[0] == 0.0
    # tokenisation: case and punctuation do not matter
    assert m.cider_d({"a": "Red, bus!", "b": "green tree"}, {"a": ["red bus."], "b": ["Green tree"]})[0] == 5.0


def test_cider_d_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="differ in keys"):
        m.cider_d({"a": "x"}, {"b": ["x"]})
    with pytest.raises(ValueError, match="'a' has no reference"):
        m.cider_d({"a": "x"}, {"a": []})


def test_cider_parity():
    cider = pytest.importorskip("pycocoevalcap.cider.cider", reason="pycocoevalcap is in the test extra")
    refs = {
        "1": ["a man riding a horse on a beach", "a person rides a brown horse near the sea",
              "a horse and rider on the sand"],
        "2": ["two dogs playing with a ball in the grass", "dogs run after a red ball",
              "a pair of dogs in a park"],
        "3": ["a plate of food with broccoli and rice", "a white plate with rice and vegetables"],
        "4": ["a red bus driving down a city street", "a double decker bus on the road",
              "a bus parked next to a building", "a large red bus in traffic"],
    }
    cands = {"1": "a man riding a horse on the beach", "2": "two dogs play with a ball",
             "3": "a plate of rice and broccoli with a fork and a knife on a table", "4": "a bus"}
    want, want_scores = cider.Cider().compute_score(refs, {k: [v] for k, v in cands.items()})
    score, per_key = m.cider_d(cands, refs)
    assert score == pytest.approx(want, rel=1e-9)
    assert [per_key[k] for k in refs] == pytest.approx(list(want_scores), rel=1e-9)


def test_roc_auc_worked_examples():
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of the 4 pairs ordered correctly
    assert m.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count one half: positives {0.5, 0.9} vs negatives {0.5, 0.2}: (0.5 + 1 + 1 + 1) / 4
    assert m.roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert m.roc_auc([3, 3, 3], [0, 1, 1]) == pytest.approx(0.5)
    assert m.roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert m.roc_auc([0.1, 0.9], [0, 1]) == 1.0


def test_roc_auc_errors():
    with pytest.raises(ValueError, match="needs both classes, got 2 positive and 0 negative"):
        m.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        m.roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="equal-length"):
        m.roc_auc([0.1, 0.2, 0.3], [0, 1])


def test_cosine_similarity():
    got = m.cosine_similarity(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, 0.0]]),
                              np.array([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0], [1.0, 0.0]]))
    np.testing.assert_allclose(got, [1.0, 1 / math.sqrt(2), -1.0, 0.0])
    with pytest.raises(ValueError, match="shapes differ"):
        m.cosine_similarity(np.ones((2, 3)), np.ones((3, 3)))
