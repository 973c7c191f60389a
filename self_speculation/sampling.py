"""Sampling as pure functions over (V,) or (T, V) float tensors.

The same processing (no-repeat n-grams, temperature, top-k, top-p) is applied to the draft and to the verifier
scores, so speculative sampling draws from exactly the distribution autoregressive sampling would.
"""

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def processors(config) -> LogitsProcessorList:
    """Transformers' own processors for a GenerationConfig; they see the whole sequence (prompt and everything generated)."""
    chain = LogitsProcessorList()
    if config.no_repeat_ngram_size > 0:
        chain.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.sample:
        if config.temperature != 1.0:
            chain.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k > 0:
            chain.append(TopKLogitsWarper(config.top_k))
        if config.top_p < 1.0:
            chain.append(TopPLogitsWarper(config.top_p))
    return chain


def greedy(scores: torch.Tensor) -> torch.Tensor:
    return scores.argmax(dim=-1)


def probabilities(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def accept_draft(p: torch.Tensor, q: torch.Tensor, token: int, generator: torch.Generator | None) -> bool:
    """Speculative rejection test: accept with probability min(1, p[token] / q[token]).

    q[token] > 0 because the token was drawn from q; where q <= p the draft is always accepted."""
    u = torch.rand((), generator=generator, device=p.device)
    return bool(u * q[token] <= p[token])


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution to resample from after a rejection: max(0, p - q), normalised."""
    r = (p - q).clamp_min(0)
    total = r.sum()
    # total == 0 only if p == q, in which case nothing is ever rejected; p is the safe answer.
    return r / total if total > 0 else p
