"""Action-text metrics for the IDM: sentence BLEU (smoothed) and ROUGE-L F, on lower-cased whitespace tokens.

Pure functions of two strings. Action texts are a handful of words, so unsmoothed BLEU would be 0 for most
near-misses (one missing 4-gram zeroes the geometric mean); we use BLEU+1 (Lin & Och 2004, "ORANGE"):
add one to the matches and the total of every n-gram order n ≥ 2, never to unigrams.
"""

from __future__ import annotations

import math
from collections import Counter


def tokens(text: str) -> list[str]:
    """Lower-cased whitespace tokens (case-insensitive, like ``idm_exact``)."""
    return text.lower().split()


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def sentence_bleu(hypothesis: str, reference: str, max_order: int = 4) -> float:
    """BLEU+1 of one hypothesis against one reference, in ``[0, 1]``.

    ``p_1 = m_1 / l_1`` and ``p_n = (m_n + 1) / (l_n + 1)`` for ``n ≥ 2`` (``m_n`` clipped matches, ``l_n``
    hypothesis n-grams); brevity penalty ``exp(1 - r / c)`` when the hypothesis is not longer than the
    reference. No unigram match gives 0; two empty texts give 1 (they are equal).
    """
    hyp, ref = tokens(hypothesis), tokens(reference)
    if not hyp or not ref:
        return float(hyp == ref)
    log_precision = 0.0
    for n in range(1, max_order + 1):
        hyp_ngrams, ref_ngrams = _ngrams(hyp, n), _ngrams(ref, n)
        matches = sum(min(count, ref_ngrams[g]) for g, count in hyp_ngrams.items())
        total = max(len(hyp) - n + 1, 0)
        if n == 1:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / total)
        else:
            log_precision += math.log((matches + 1) / (total + 1))
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision / max_order)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(|a|·|b|) dynamic programme)."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (β = 1): harmonic mean of LCS precision and recall, in ``[0, 1]``; two empty texts give 1."""
    hyp, ref = tokens(hypothesis), tokens(reference)
    if not hyp or not ref:
        return float(hyp == ref)
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
