"""Choosing tokens, on the device, for every row of a batch at once: pure functions over (..., V) float tensors,
and the logits processing a configuration asks for.

The same processing (no-repeat n-grams, temperature, top-k, top-p) is applied to the draft and to the verifier
scores. A sampled token is drawn by the exponential race with noise that belongs to its position in its row's
sequence (`race_noise`), not to the order of draws: the draft and the verifier of a position race with the same
noise, and the verifier's winner is what autoregressive sampling with that seed would draw there. So speculative
sampling is lossless by construction, and its tokens are autoregressive sampling's, whatever the draft length,
the batch or the timing that chose them. Nothing here reads a tensor back to the host: a decoding step reads its
results once, at its end (strategies.py).
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


def sample(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One draw from each distribution in `probs` (..., V): a tensor of shape (...). By the exponential race:
    with E_i ~ Exp(1) independent (`noise`, (..., V)), E_i / p_i ~ Exp(p_i), and the smallest of them (the largest
    p_i / E_i) is i with probability p_i. The law of `torch.multinomial`, without the two reads of its input it
    makes on CUDA."""
    return (probs / noise).argmax(dim=-1)  # p_i = 0: 0 / E = 0, never drawn (E > 0, so never 0 / 0)


# splitmix64's constants as signed 64-bit integers (torch has no unsigned arithmetic): the golden-ratio step, which
# spreads consecutive keys apart, and the finalizer's two multipliers
_STEP, _M1, _M2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits, unsigned (torch shifts a signed integer's sign bit in)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: each output bit depends on every input bit (products wrap around, as in C)."""
    x = (x ^ _shift(x, 30)) * _M1
    x = (x ^ _shift(x, 27)) * _M2
    return x ^ _shift(x, 31)


def race_noise(streams: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise (B, T, V) for the tokens at `positions` (B, T) of B sequences, `streams` (B,) naming each (a
    seed and the sequence's number): a hash of (stream, position, token) made uniform and then exponential, so a
    position's noise is the same whenever and beside whatever it is drawn. torch's generators cannot give that:
    their draws depend on the order and the shapes they are made in. 53 bits per draw, as float64 draws have."""
    keys = _mix(streams[:, None] + positions * _STEP)  # (B, T)
    bits = _mix(keys[..., None] + torch.arange(vocab, device=keys.device) * _STEP)  # (B, T, V)
    uniform = (_shift(bits, 11).double() + 0.5) * 2.0**-53  # in (0, 1)
    return uniform.log().neg_().float()


def first_rejection(accepted: torch.Tensor) -> torch.Tensor:
    """Per row of `accepted` (B, D): how many of its leading entries are True (the drafts kept)."""
    return accepted.long().cumprod(dim=-1).sum(dim=-1)
