"""Sampling: the pure functions, and a statistical test that speculative sampling is lossless."""

import collections
import copy
import dataclasses

import pytest
import torch
from scipy.stats import chi2_contingency, chisquare, kstest

from models import tiny_llama
from self_speculation import GenerationConfig, Generator, drafting, strategies
from self_speculation.sampling import Processing, first_rejection, greedy, race_noise, sample


def test_greedy_is_argmax_per_row():
    scores = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert greedy(scores).tolist() == [1, 0]


def test_first_rejection_counts_the_leading_acceptances():
    accepted = torch.tensor([[True, True, False, True], [False, True, True, True], [True] * 4])
    assert first_rejection(accepted).tolist() == [2, 0, 4]
    assert first_rejection(torch.ones((2, 0), dtype=torch.bool)).tolist() == [0, 0]


def draws(probs: torch.Tensor, streams: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Tokens (N, T) drawn from `probs` (V,) at `positions` (N, T) of `streams` (N,)."""
    return sample(probs, race_noise(streams, positions, probs.shape[0]))


def test_sample_follows_the_distribution():
    N = 20000
    counts = collections.Counter(draws(torch.tensor([0.1, 0.6, 0.3, 0.0]), torch.arange(N), torch.zeros(N, 1,
                                 dtype=torch.long))[:, 0].tolist())
    assert chisquare([counts[i] for i in range(3)], [N * p for p in (0.1, 0.6, 0.3)]).pvalue > 1e-3
    assert counts[3] == 0  # probability 0: never drawn


def test_race_noise_is_exponential_and_independent_between_positions_streams_and_tokens():
    """Exp(1) by a Kolmogorov-Smirnov test; draws at neighbouring positions of one stream, and at one position
    of neighbouring streams, independent by a chi-square test of their joint counts."""
    N, probs = 20000, torch.tensor([0.2, 0.5, 0.3])
    noise = race_noise(torch.arange(4) + (42 << 32), torch.arange(N // 8).expand(4, N // 8), 8).flatten()
    assert kstest(noise.double().numpy(), "expon").pvalue > 1e-3
    streams = torch.arange(N) + (7 << 32)
    pairs = [draws(probs, streams, torch.tensor([[5, 6]]).expand(N, 2)),  # one stream, two positions
             draws(probs, streams, torch.full((N, 1), 9)).view(N // 2, 2)]  # one position, two streams
    for pair in pairs:
        joint = collections.Counter(map(tuple, pair.tolist()))
        assert chi2_contingency([[joint[a, b] for b in range(3)] for a in range(3)]).pvalue > 1e-3


def test_race_noise_belongs_to_its_position_whatever_is_drawn_beside_it():
    """A position's noise is the same drawn alone, among others in any order, or in another row: the property
    that makes a speculative step's draws those of autoregressive decoding."""
    streams = torch.tensor([3, 4])
    together = race_noise(streams, torch.tensor([[10, 11, 12], [12, 10, 11]]), 16)
    alone = race_noise(streams[:1], torch.tensor([[11]]), 16)
    torch.testing.assert_close(together[0, 1], alone[0, 0], atol=0, rtol=0)
    torch.testing.assert_close(together[1, 2], race_noise(streams[1:], torch.tensor([[11]]), 16)[0, 0], atol=0, rtol=0)
    assert not torch.equal(together[0, 0], together[1, 1])  # position 10 of two streams
    assert (together > 0).all() and torch.isfinite(together).all()


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


def continuations(model, config: GenerationConfig, seed: int, rows: int = 1) -> collections.Counter:
    """SAMPLES continuations of PROMPT, `rows` at a time in one batch (each row draws with its own noise stream,
    as a prompt alone would)."""
    generator = Generator(model, None, config, seed=seed)
    return collections.Counter(tuple(result.tokens) for _ in range(SAMPLES // rows)
                               for result in generator.generate_batch([PROMPT] * rows))


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
    return continuations(small_vocab_model, SAMPLING, seed=1, rows=500)  # the same draws as one at a time


def test_speculative_sampling_matches_autoregressive_sampling(small_vocab_model, autoregressive_samples):
    speculative = continuations(small_vocab_model, SPECULATIVE, seed=2)
    p_value = homogeneity_p_value(autoregressive_samples, speculative)
    print(f"p = {p_value:.3g} over {len(speculative)} distinct continuations")
    assert p_value > 1e-3


def test_the_same_test_catches_a_wrong_acceptance_rule(small_vocab_model, autoregressive_samples, monkeypatch):
    """Accepting every draft samples from the early exit instead of the full model; the test must notice."""
    monkeypatch.setattr(strategies, "first_rejection", lambda agree: torch.full(agree.shape[:1], agree.shape[1]))
    wrong = continuations(small_vocab_model, SPECULATIVE, seed=2, rows=500)
    p_value = homogeneity_p_value(autoregressive_samples, wrong)
    print(f"p = {p_value:.3g}")
    assert p_value < 1e-6


def test_speculative_sampling_is_lossless_in_bfloat16(small_vocab_model):
    """The same test with the model in bfloat16: the verifier's rounding must not bias the accepted tokens (in
    batches of 500 rows, for time: a prompt draws in a batch as alone, by
    test_speculative_sampling_draws_autoregressive_samplings_tokens)."""
    model = copy.deepcopy(small_vocab_model).to(torch.bfloat16)
    p_value = homogeneity_p_value(continuations(model, SAMPLING, seed=1, rows=500),
                                  continuations(model, SPECULATIVE, seed=2, rows=500))
    print(f"p = {p_value:.3g}")
    assert p_value > 1e-3


SETTINGS = [(1, 1), (1, 3), (2, 2), (3, 5), (5, 8)]  # (exit layer, draft length)


@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied"])
def test_speculative_sampling_draws_autoregressive_samplings_tokens(request, name):
    """Token for token, with the same seed: every token is the full model's draw with its position's noise, for
    every exit layer and draft length, and in a batch (rows leaving early) as alone."""
    model, prompts = request.getfixturevalue(name), [[0, 5, 17, 33, 2, 9], [0, 71, 71, 4], [0] + list(range(40, 70))]
    config = GenerationConfig(sample=True, temperature=1.2, top_k=40, top_p=0.95, max_steps=40, batch_drafts=False)
    autoregressive = Generator(model, None, config, seed=5)
    expected = [autoregressive.generate_ids(p).tokens for p in prompts]  # the prompts' streams: 0, 1, 2
    assert len({tuple(t) for t in expected}) == 3 and all(len(t) == 40 for t in expected)
    for exit_layer, num_speculations in SETTINGS:
        speculative = dataclasses.replace(config, generation_strategy="self_speculative", exit_layer=exit_layer,
                                          num_speculations=num_speculations)
        alone = Generator(model, None, speculative, seed=5)
        assert [alone.generate_ids(p).tokens for p in prompts] == expected, (exit_layer, num_speculations)
        batched = Generator(model, None, speculative, seed=5)
        assert [r.tokens for r in batched.generate_batch(prompts)] == expected, (exit_layer, num_speculations)
    other_seed = Generator(model, None, config, seed=6).generate_ids(prompts[0]).tokens
    assert other_seed != expected[0]


def test_a_seeded_sampled_batch_repeats_whatever_draft_length_is_chosen(gqa_tied, monkeypatch):
    """A batch's draft length is chosen from pass costs timed on this machine; the tokens must not depend on it."""
    config = dataclasses.replace(SPECULATIVE, exit_layer=3, max_steps=30, batch_drafts=True, draft_policy="static")
    prompts = [[0, 5, 17, 33, 2, 9], [0, 71, 71, 4], [0, 3]]
    outputs = []
    for drafts in (0, 1, 4):
        monkeypatch.setattr(drafting.Static, "drafts", lambda self, plans: drafts)
        outputs.append([r.tokens for r in Generator(gqa_tied, None, config, seed=3).generate_batch(prompts)])
    assert outputs[0] == outputs[1] == outputs[2]
