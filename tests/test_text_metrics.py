"""BLEU+1 and ROUGE-L against values worked out by hand."""

import math

import pytest

from swirl_vl.eval.text_metrics import lcs_length, rouge_l, sentence_bleu, tokens


def test_tokens_are_lower_cased_whitespace_words():
    assert tokens("  Move the RED\tcircle\nleft ") == ["move", "the", "red", "circle", "left"]


def test_bleu_identical_and_case_insensitive():
    assert sentence_bleu("Move the red circle left", "move the red circle left") == pytest.approx(1.0)


def test_bleu_one_word_substituted():
    # p1 = 4/5; smoothed p2 = (3+1)/(4+1), p3 = (2+1)/(3+1), p4 = (1+1)/(2+1); same length: no brevity penalty.
    expected = (4 / 5 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25  # = 0.32 ** 0.25
    assert sentence_bleu("move the red circle left", "move the red circle right") == pytest.approx(expected)
    assert expected == pytest.approx(0.752121, abs=1e-6)


def test_bleu_brevity_penalty_for_a_short_hypothesis():
    # Every n-gram of the 4-word hypothesis matches (all precisions 1); c = 4, r = 5: BP = exp(1 - 5/4).
    assert sentence_bleu("move the red circle", "move the red circle left") == pytest.approx(math.exp(-0.25))


def test_bleu_clips_repeated_words_and_has_no_penalty_when_longer():
    # hyp "the the the" vs ref "the cat": p1 = min(3, 1)/3; p2 = (0+1)/(2+1); p3 = (0+1)/(1+1);
    # p4: no 4-gram in the hypothesis, (0+1)/(0+1) = 1. c = 3 > r = 2: BP = 1.
    expected = (1 / 3 * 1 / 3 * 1 / 2 * 1) ** 0.25
    assert sentence_bleu("the the the", "the cat") == pytest.approx(expected)


def test_bleu_edge_cases():
    assert sentence_bleu("remove the green triangle", "add a red square") == 0.0  # no unigram in common
    assert sentence_bleu("", "move the red circle left") == 0.0
    assert sentence_bleu("move", "") == 0.0
    assert sentence_bleu("", "") == 1.0


def test_lcs_length():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook CLRS example
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_values():
    # LCS("paint the blue square red", "paint the red square blue") = 3 ("paint the square"): P = R = 3/5.
    assert rouge_l("paint the blue square red", "paint the red square blue") == pytest.approx(0.6)
    # LCS = 3, P = 3/3, R = 3/5: F = 2 * 1 * 0.6 / 1.6.
    assert rouge_l("move the circle", "move the red circle left") == pytest.approx(0.75)
    assert rouge_l("Move The Red Circle Left", "move the red circle left") == pytest.approx(1.0)
    assert rouge_l("add a square", "remove the green triangle") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("move", "") == 0.0
