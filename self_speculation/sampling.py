"""Choosing tokens, on the device, for every row of a batch at once: pure functions over (..., V) float tensors,
and the logits processing a configuration asks for.

The same processing (no-repeat n-grams, temperature, top-k, top-p) is applied to the draft and to the verifier
scores, so speculative sampling draws from exactly the distribution autoregressive sampling would. Nothing here
reads a tensor back to the host: a decoding step reads its results once, at its end (strategies.py).
"""

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class Processing:
    """Transformers' processors for a GenerationConfig over the scores (B, V) of every row. The warpers
    (temperature, top-k, top-p) see one row's scores alone; the no-repeat n-gram rule sees each row's whole
    sequence (prompt, everything generated, its drafts so far): `contexts` (B, T) when the rows have one length,
    else one (T_b,) tensor per row."""

    def __init__(self, config):
        self.ngram = NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size) if config.no_repeat_ngram_size else None
        self.warpers = LogitsProcessorList()
        if config.sample:
            if config.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k > 0:
                self.warpers.append(TopKLogitsWarper(config.top_k))
            if config.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(config.top_p))

    def __bool__(self) -> bool:
        return self.ngram is not None or bool(self.warpers)

    def __call__(self, contexts, scores: torch.Tensor) -> torch.Tensor:
        if self.ngram is not None:
            if isinstance(contexts, torch.Tensor):
                scores = self.ngram(contexts, scores)
            else:
                scores = torch.cat([self.ngram(c[None], s[None]) for c, s in zip(contexts, scores)])
        return self.warpers(None, scores) if self.warpers else scores


def greedy(scores: torch.Tensor) -> torch.Tensor:
    return scores.argmax(dim=-1)


def probabilities(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from each distribution in `probs` (..., V): a tensor of shape (...). By the exponential race:
    with E_i ~ Exp(1) independent, E_i / p_i ~ Exp(p_i), and the smallest of them (the largest p_i / E_i) is i with
    probability p_i. The same law as `torch.multinomial`, without the two reads of its input it makes on CUDA."""
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)  # p_i = 0: 0 / E = 0, never drawn (E > 0, so never 0 / 0)


def accept_draft(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Speculative rejection test for drafts `tokens` (...) drawn from q (..., V) under the target p: accept each
    with probability min(1, p[token] / q[token]); q[token] > 0 because the token was drawn from q, and where
    q <= p the draft is always accepted. True where accepted."""
    u = torch.rand(tokens.shape, generator=generator, device=p.device)
    index = tokens.unsqueeze(-1)
    return u * q.gather(-1, index).squeeze(-1) <= p.gather(-1, index).squeeze(-1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distributions (..., V) to resample from after a rejection: max(0, p - q), normalised."""
    r = (p - q).clamp_min(0)
    total = r.sum(dim=-1, keepdim=True)
    # total == 0 only if p == q, in which case nothing is ever rejected; p is the safe answer.
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def first_rejection(accepted: torch.Tensor) -> torch.Tensor:
    """Per row of `accepted` (B, D): how many of its leading entries are True (the drafts kept)."""
    return accepted.long().cumprod(dim=-1).sum(dim=-1)
