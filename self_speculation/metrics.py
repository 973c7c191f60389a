"""Quality metrics of generated text against references, through well-kept libraries, in a table. Each library is
imported where it is used, so that a machine with only torch and transformers (a GPU box running the quick check)
still benchmarks, without the metrics it lacks."""

from collections.abc import Callable

ROUGE_TYPES = ("rouge1", "rouge2", "rouge3", "rougeL")


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures on lowercased text."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES))
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference.lower(), prediction.lower())
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu's default tokenisation), 0-100."""
    from sacrebleu import corpus_bleu

    return {"bleu": corpus_bleu(predictions, [references]).score}


def exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Share of predictions equal to their reference (surrounding white space ignored)."""
    return {"exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)}


def edit_distance(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean character Levenshtein distance, and the same divided by the longer string's length. rapidfuzz's, not
    nltk's: nltk refuses strings over 2,000 characters (a HumanEval output of 128 tokens can be longer), and its
    pure-Python table would take seconds per pair there."""
    from rapidfuzz.distance import Levenshtein

    distances = [(Levenshtein.distance(p, r), max(len(p), len(r), 1)) for p, r in zip(predictions, references)]
    return {
        "edit_distance": sum(d for d, _ in distances) / len(distances),
        "normalized_edit_distance": sum(d / n for d, n in distances) / len(distances),
    }


METRICS: dict[str, Callable[[list[str], list[str]], dict[str, float]]] = {
    "rouge": rouge,
    "bleu": bleu,
    "exact_match": exact_match,
    "edit_distance": edit_distance,
}


def quality(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every metric of the table whose library is installed; empty when there are no references."""
    if not predictions or not any(references):
        return {}
    scores = {}
    for metric in METRICS.values():
        try:
            scores |= metric(predictions, references)
        except ImportError:
            continue
    return scores
