"""Sampling: the pure functions, and a statistical test that speculative sampling is lossless."""

import collections
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2_contingency

from models import tiny_llama
from self_speculation import GenerationConfig, Generator, strategies
from self_speculation.sampling import Processing, accept_draft, first_rejection, greedy, residual, sample


def test_greedy_is_argmax_per_row():
    scores = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert greedy(scores).tolist() == [1, 0]


def test_residual_is_the_normalised_positive_part():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.5, 0.1, 0.2])
    torch.testing.assert_close(residual(p, q), torch.tensor([0.75, 0.0, 0.25, 0.0]))
    torch.testing.assert_close(residual(p, p), p)  # nothing to correct
    torch.testing.assert_close(residual(torch.stack([p, p]), torch.stack([q, p])), torch.stack([residual(p, q), p]))


def test_first_rejection_counts_the_leading_acceptances():
    accepted = torch.tensor([[True, True, False, True], [False, True, True, True], [True] * 4])
    assert first_rejection(accepted).tolist() == [2, 0, 4]
    assert first_rejection(torch.ones((2, 0), dtype=torch.bool)).tolist() == [0, 0]


def test_accept_draft_probability_is_min_of_one_and_p_over_q():
    p = torch.tensor([0.2, 0.8])
    q = torch.tensor([0.5, 0.5])
    generator = torch.Generator().manual_seed(0)
    p, q = p.expand(20000, 2), q.expand(20000, 2)  # one test per row
    accepted = accept_draft(p, q, torch.zeros(20000, dtype=torch.long), generator).float().mean().item()
    assert abs(accepted - 0.4) < 0.015
    assert accept_draft(p, q, torch.ones(20000, dtype=torch.long), generator).all()  # q <= p: always accept


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    generator = torch.Generator().manual_seed(0)
    counts = collections.Counter(sample(probs.expand(20000, 3), generator).tolist())
    assert abs(counts[1] / 20000 - 0.6) < 0.015 and counts[0] > 0 and counts[2] > 0


def test_one_speculative_step_draws_exactly_from_the_full_model(monkeypatch):
    """The acceptance rule and the residual, exactly: every draft token (weighted by q) against a grid of N evenly
    spaced uniform draws through `SelfSpeculative.verify`; the first token a step emits (the draft if accepted,
    else the residual's draw, taken as its distribution) is then distributed as p up to 1/N. Accepting every
    draft would give q; resampling from p after a rejection, or accepting with q / p, neither."""
    p, q, N, V = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.4, 0.3, 0.2, 0.1]), 1000, 4
    drafts = torch.arange(V).repeat_interleave(N)[:, None]  # (V·N, 1): each draft token N times
    grid = ((torch.arange(N) + 0.5) / N).repeat(V)[:, None]  # the uniform draws, evenly spaced for each token
    monkeypatch.setattr(torch, "rand", lambda shape, **kwargs: grid.view(shape))
    drawn_from = []
    monkeypatch.setattr(strategies, "sample", lambda probs, generator: drawn_from.append(probs) or probs.argmax(-1))
    config = GenerationConfig(sample=True, temperature=1.0, top_p=1.0)  # p and q as they are
    d = strategies.Decoding(None, config, None, [], Processing(config), None, frozenset())
    logits = torch.stack([p.log(), torch.full((V,), -1.0)]).expand(V * N, 2, V)  # the verifier: p, then anything
    accepted, _ = strategies.SelfSpeculative.verify(d, None, drafts, [q.expand(V * N, V)], logits)
    first = torch.where((accepted > 0)[:, None], F.one_hot(drafts[:, 0], V).float(), drawn_from[-1])  # (V·N, V)
    emitted = (q[:, None] * first.view(V, N, V).mean(dim=1)).sum(dim=0)
    torch.testing.assert_close(emitted, p, atol=2 / N, rtol=0)


def test_warpers_follow_the_config():
    config = GenerationConfig(sample=True, temperature=0.5, top_k=2, top_p=1.0)
    scores = Processing(config)(None, torch.tensor([[1.0, 3.0, 2.0, 0.0]]))
    assert torch.isinf(scores[0, [0, 3]]).all() and scores[0, 1].item() == 6.0
    assert not Processing(GenerationConfig(sample=False))


def test_no_repeat_ngrams_see_each_rows_own_sequence():
    """Rows of one length share a (B, T) context; ragged rows each have their own, with the same result."""
    ngrams = Processing(GenerationConfig(sample=False, no_repeat_ngram_size=2))
    scores = torch.zeros(2, 6)
    shared = ngrams(torch.tensor([[1, 2, 1], [3, 4, 3]]), scores)
    ragged = ngrams([torch.tensor([1, 2, 1]), torch.tensor([5, 3, 4, 3])], scores)
    assert torch.isinf(shared[0, 2]) and torch.isinf(shared[1, 4]) and torch.isinf(shared).sum() == 2
    assert torch.equal(shared, ragged)


# Lossless sampling: sample continuations both ways and compare their distributions.
PROMPT = [0, 3, 5]
MAX_STEPS = 4  # the first token comes from the prompt pass; the other three from drafts and verification
SAMPLES = 3000
SAMPLING = GenerationConfig(sample=True, temperature=0.9, top_k=6, top_p=0.95, max_steps=MAX_STEPS)
SPECULATIVE = dataclasses.replace(SAMPLING, generation_strategy="self_speculative", exit_layer=1, num_speculations=3)


@pytest.fixture(scope="module")
def small_vocab_model():
    """Vocabulary of 8; the exit at layer 1 is far from the full model (total variation about 0.3)."""
    return tiny_llama(vocab_size=8, num_layers=4, init_std=0.2, layer_scale=0.3, eos_token_id=None)


def continuations(model, config: GenerationConfig, seed: int) -> collections.Counter:
    generator = Generator(model, None, config, seed=seed)
    return collections.Counter(tuple(generator.generate_ids(PROMPT).tokens) for _ in range(SAMPLES))


def homogeneity_p_value(a: collections.Counter, b: collections.Counter) -> float:
    """Chi-square test that two samples come from one distribution; rare outcomes are pooled into one cell
    so that every expected count is at least 5."""
    outcomes = set(a) | set(b)
    table = [[a[o], b[o]] for o in outcomes if a[o] + b[o] >= 10]
    rare = [sum(a[o] for o in outcomes if a[o] + b[o] < 10), sum(b[o] for o in outcomes if a[o] + b[o] < 10)]
    if sum(rare):
        table.append(rare)
    return chi2_contingency(table).pvalue


@pytest.fixture(scope="module")
def autoregressive_samples(small_vocab_model):
    return continuations(small_vocab_model, SAMPLING, seed=1)


def test_speculative_sampling_matches_autoregressive_sampling(small_vocab_model, autoregressive_samples):
    speculative = continuations(small_vocab_model, SPECULATIVE, seed=2)
    p_value = homogeneity_p_value(autoregressive_samples, speculative)
    print(f"p = {p_value:.3g} over {len(speculative)} distinct continuations")
    assert p_value > 1e-3


def test_the_same_test_catches_a_wrong_acceptance_rule(small_vocab_model, autoregressive_samples, monkeypatch):
    """Accepting every draft samples from the early exit instead of the full model; the test must notice."""
    monkeypatch.setattr(strategies, "accept_draft", lambda p, q, tokens, generator: torch.ones_like(tokens).bool())
    wrong = continuations(small_vocab_model, SPECULATIVE, seed=2)
    p_value = homogeneity_p_value(autoregressive_samples, wrong)
    print(f"p = {p_value:.3g}")
    assert p_value < 1e-6


def test_speculative_sampling_is_lossless_in_bfloat16(small_vocab_model):
    """The same test with the model in bfloat16: the verifier's rounding must not bias the accepted tokens."""
    model = copy.deepcopy(small_vocab_model).to(torch.bfloat16)
    p_value = homogeneity_p_value(continuations(model, SAMPLING, seed=1), continuations(model, SPECULATIVE, seed=2))
    print(f"p = {p_value:.3g}")
    assert p_value > 1e-3
