"""Quality metrics against hand-computed values."""

import pytest

from self_speculation.metrics import bleu, edit_distance, exact_match, quality, rouge


def test_rouge_by_hand():
    # prediction "the cat sat", reference "the cat ran": unigram overlap 2/3, bigram overlap 1/2
    scores = rouge(["The cat sat"], ["the cat ran"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(1 / 2)
    assert scores["rouge3"] == pytest.approx(0.0)
    assert scores["rougeL"] == pytest.approx(2 / 3)


def test_bleu_perfect_and_disjoint():
    sentence = "the quick brown fox jumps over the lazy dog"
    assert bleu([sentence], [sentence])["bleu"] == pytest.approx(100.0)
    assert bleu(["alpha beta gamma delta"], [sentence])["bleu"] == pytest.approx(0.0)


def test_exact_match_is_not_an_edit_distance():
    assert exact_match(["abc ", "abd"], ["abc", "abc"])["exact_match"] == 0.5
    scores = edit_distance(["kitten", "abc"], ["sitting", "abc"])
    assert scores["edit_distance"] == pytest.approx(1.5)  # 3 and 0
    assert scores["normalized_edit_distance"] == pytest.approx((3 / 7 + 0) / 2)


def test_edit_distance_of_long_outputs():
    """A long generation against a long reference (nltk's edit distance refuses strings over 2,000 characters,
    which ended a whole benchmark run of HumanEval in a traceback after its last example)."""
    reference = "def f(x):\n    return x\n" * 120  # 2,760 characters
    prediction = reference[:1000] + "X" + reference[1001:2000] + reference[2002:] + "!"  # 1 substitution, 2 deletions, 1 insertion
    scores = edit_distance([prediction], [reference])
    assert scores["edit_distance"] == 4
    assert scores["normalized_edit_distance"] == pytest.approx(4 / len(reference))


def test_no_references_no_quality_metrics():
    assert quality(["x"], [""]) == {}
    assert set(quality(["x"], ["x"])) >= {"rouge1", "bleu", "exact_match", "edit_distance"}
