"""The benchmarks' metrics, as their official evaluation code defines them.

- VQA accuracy (VQAv2, OKVQA, VizWiz, TextVQA): the VQA challenge's `vqaEval.py` — its answer
  normalisation and the average over the 10 leave-one-out subsets of the human answers.
- exact match (GQA, MSVD-QA, MSRVTT-QA) after that same normalisation.
- CIDEr-D (COCO captions): coco-caption's `pycocoevalcap/cider` (which is CIDEr-D).
- ROC AUC (Hateful Memes): Mann-Whitney U with average ranks for ties.
- cosine similarity of encoder features (CLIP-I of generated vs reference images; RICES).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# VQA answer normalisation (vqaEval.py of the VQA challenge), kept with its quirks: keys with capitals
# ("Im", "Ive", ...) never match because words are lowercased first, and "somebody'd" maps backwards.

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern as written: "(?!<=\d)" is a lookahead, not a lookbehind, so this removes every
# period not followed by a digit ("1." loses its period, "2.5" keeps it).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def process_punctuation(text: str) -> str:
    """`processPunctuation`: a mark touching a space (or any mark, once a digit,digit appears) is
    deleted, otherwise it becomes a space; then periods not followed by a digit go."""
    out = text
    drop_all = COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or drop_all) else " ")
    return PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """`processDigitArticle`: lowercase words, number words 0-10 -> digits, drop articles,
    restore apostrophes of known contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """What vqaEval does to a predicted answer: tabs/newlines -> spaces, strip, punctuation, digits/articles."""
    return process_digit_article(process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy in [0, 1]: the mean over the human answers of min(1, #others equal to the
    prediction / 3), "others" being the answers without that one (10 leave-one-out subsets).

    As in vqaEval.py, the prediction is fully normalised (`normalize_answer`), while the human answers
    (already normalised in the official annotation files) only go through `process_punctuation`, and
    only when they are not all identical."""
    if not answers:
        raise ValueError(f"vqa_accuracy({prediction!r}, []): no human answers")
    pred = normalize_answer(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when prediction and answer agree after `normalize_answer` (lowercase, stripped, punctuation
    handled as in vqaEval, number words -> digits, articles dropped), else 0.0: "The dog." == "dog"."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


# ---------------------------------------------------------------------------------------------
# CIDEr-D (coco-caption pycocoevalcap/cider/cider_scorer.py).

CIDER_N = 4
CIDER_SIGMA = 6.0


def caption_tokens(text: str) -> list[str]:
    """Lowercased runs of letters/digits. Stands in for coco-caption's PTB tokenizer (Java), which also
    lowercases and drops punctuation tokens; it differs on clitics and hyphens ("dog's" -> "dog s",
    where PTB gives "dog 's"; "t-shirt" -> "t shirt")."""
    return re.findall(r"[^\W_]+", text.lower())


def _ngram_counts(tokens: Sequence[str], n: int = CIDER_N) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _tfidf(counts: Counter, df: Mapping[tuple, float], log_corpus: float) -> tuple[list[dict], np.ndarray, int]:
    """Per-order tf-idf vectors, their norms, and the "length" coco-caption uses: the number of bigrams."""
    vec: list[dict] = [{} for _ in range(CIDER_N)]
    for gram, tf in counts.items():
        vec[len(gram) - 1][gram] = tf * (log_corpus - math.log(max(1.0, df.get(gram, 0.0))))
    norms = np.array([math.sqrt(sum(v * v for v in order.values())) for order in vec])
    return vec, norms, sum(c for g, c in counts.items() if len(g) == 2)


def _cider_pair(cand: tuple, ref: tuple) -> float:
    """Mean over n-gram orders of the clipped cosine, times the gaussian length penalty."""
    (vc, nc, lc), (vr, nr, lr) = cand, ref
    penalty = math.exp(-((lc - lr) ** 2) / (2 * CIDER_SIGMA ** 2))
    total = 0.0
    for k in range(CIDER_N):
        dot = sum(min(v, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, v in vc[k].items())
        if nc[k] != 0 and nr[k] != 0:
            dot /= nc[k] * nr[k]
        total += dot * penalty
    return total / CIDER_N


def cider_d(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]
            ) -> tuple[float, dict[str, float]]:
    """CIDEr-D of one candidate caption per key against that key's references: (corpus mean, per key).

    n-grams 1..4 weighted by tf-idf, the document frequency being the number of keys whose references
    contain the n-gram (idf = log(#keys) - log(max(1, df))); candidate weights clipped by the
    reference's; gaussian length penalty (sigma 6); averaged over references and orders, times 10."""
    if set(candidates) != set(references):
        odd = sorted(set(candidates) ^ set(references), key=str)[:3]
        raise ValueError(f"cider_d: candidates and references differ in keys (e.g. {odd})")
    if empty := [k for k, refs in references.items() if not refs]:
        raise ValueError(f"cider_d: key {empty[0]!r} has no reference")
    refs = {k: [_ngram_counts(caption_tokens(r)) for r in rs] for k, rs in references.items()}
    df: Counter = Counter(g for counts in refs.values() for g in set().union(*counts))
    log_corpus = math.log(len(refs))
    scores = {}
    for key, cand in candidates.items():
        vc = _tfidf(_ngram_counts(caption_tokens(cand)), df, log_corpus)
        pairs = [_cider_pair(vc, _tfidf(r, df, log_corpus)) for r in refs[key]]
        scores[key] = 10.0 * sum(pairs) / len(pairs)
    return float(np.mean(list(scores.values()))), scores


# ---------------------------------------------------------------------------------------------
# ROC AUC and cosine similarity.


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + P(tie) / 2, computed
    as Mann-Whitney U / (#pos * #neg) with average ranks for tied scores. Labels are 0 / 1."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"roc_auc: want equal-length 1-D scores and labels, got {s.shape} and {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"roc_auc: labels must be 0 or 1, got {sorted(set(y.tolist()) - {0, 1})[:3]}")
    pos, neg = int(y.sum()), int(y.size - y.sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"roc_auc: needs both classes, got {pos} positive and {neg} negative labels")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2)[inverse]  # 1-based, ties share their mean rank
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero, so their cosines are 0)."""
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two [N, D] feature arrays (CLIP-I: generated vs reference image features)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"cosine_similarity: feature shapes differ, {a.shape} vs {b.shape}")
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)
