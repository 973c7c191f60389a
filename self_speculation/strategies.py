"""Generation strategies, in a table. A strategy has two methods:

- `prefill(decoding, prompt)` runs the prompt (1, T) and returns the logits (V,) of the first new token;
- `step(decoding, budget)` takes the newest token (the one not yet in the cache) and returns a StepResult with
  between 1 and `budget` new tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import Cache, LogitsProcessorList, PreTrainedModel

from . import layers
from .sampling import accept_draft, greedy, probabilities, residual, sample

if TYPE_CHECKING:
    from .config import GenerationConfig


@dataclass
class Decoding:
    """The state of one generation, shared by the decoding loop and the strategy."""

    model: PreTrainedModel
    config: GenerationConfig
    cache: Cache
    sequence: list[int]  # prompt and generated tokens; the last one is not in the cache yet
    processors: LogitsProcessorList
    generator: torch.Generator | None
    stop_ids: frozenset[int]  # drafting ends at these
    on_draft: Callable[[int], None] | None = None

    def ids(self, token: int) -> torch.Tensor:
        return torch.tensor([[token]], device=self.model.lm_head.weight.device)  # (1, 1)

    def scores(self, logits: torch.Tensor, drafts: list[int]) -> torch.Tensor:
        """Processed scores (V,) for the position after `sequence + drafts`."""
        if not self.processors:
            return logits
        context = torch.tensor([self.sequence + drafts], device=logits.device)  # (1, T)
        return self.processors(context, logits[None])[0]

    def choose(self, scores: torch.Tensor) -> int:
        if self.config.sample:
            return sample(probabilities(scores), self.generator)
        return int(greedy(scores))


@dataclass
class StepResult:
    tokens: list[int]  # accepted drafts, then one token from the verifier
    drafted: int = 0
    accepted: int = 0


class Autoregressive:
    """One token per step from the full model, or from the first `exit_layer` layers (plain early exit)."""

    @staticmethod
    def passes(config: GenerationConfig, num_layers: int) -> set[tuple[int, int, int]]:
        """The passes a step makes, (start layer, end layer, tokens): what `--compile` compiles."""
        return {(0, config.exit_layer if config.exit_layer > 0 else num_layers, 1)}

    def logits(self, d: Decoding, token_ids: torch.Tensor) -> torch.Tensor:
        if d.config.exit_layer > 0:
            return layers.early_exit(d.model, token_ids, d.cache, d.config.exit_layer, last_only=True).logits[0, -1]
        return layers.full_forward(d.model, token_ids, d.cache, last_only=True)[0, -1]

    def prefill(self, d: Decoding, prompt: torch.Tensor) -> torch.Tensor:
        return self.logits(d, prompt)

    def step(self, d: Decoding, budget: int) -> StepResult:
        return StepResult([d.choose(d.scores(self.logits(d, d.ids(d.sequence[-1])), []))])


class SelfSpeculative:
    """Draft with layers [0, E), verify every draft in one pass of layers [E, L) over their cached exit-layer
    hidden states, keep the longest agreeing prefix plus one token of the full model."""

    @staticmethod
    def passes(config: GenerationConfig, num_layers: int) -> set[tuple[int, int, int]]:
        """Drafting one token at a time, verifying a full draft (a shorter one, at a stop token or at the end of
        the budget, runs uncompiled)."""
        return {(0, config.exit_layer, 1), (config.exit_layer, num_layers, config.num_speculations + 1)}

    def prefill(self, d: Decoding, prompt: torch.Tensor) -> torch.Tensor:
        return layers.full_forward(d.model, prompt, d.cache, last_only=True)[0, -1]

    def step(self, d: Decoding, budget: int) -> StepResult:
        exit_layer = d.config.exit_layer
        drafts, draft_scores, exit_hiddens = [], [], []
        token = d.sequence[-1]
        for _ in range(min(d.config.num_speculations, budget - 1)):
            out = layers.early_exit(d.model, d.ids(token), d.cache, exit_layer)
            exit_hiddens.append(out.hidden)
            scores = d.scores(out.logits[0, -1], drafts)
            token = d.choose(scores)
            drafts.append(token)
            draft_scores.append(scores)
            if d.on_draft is not None:
                d.on_draft(token)
            if token in d.stop_ids:
                break
        # The last draft (or, with no drafts, the newest token) has not been through layers [0, E) yet.
        exit_hiddens.append(layers.exit_hidden(d.model, d.ids(token), d.cache, exit_layer))
        logits = layers.remainder(d.model, torch.cat(exit_hiddens, dim=1), d.cache, exit_layer)[0]  # (D+1, V)
        accepted, final = self.verify(d, drafts, draft_scores, logits)
        layers.rollback(d.cache, len(drafts) - accepted)
        return StepResult(drafts[:accepted] + [final], drafted=len(drafts), accepted=accepted)

    @staticmethod
    def verify(
        d: Decoding, drafts: list[int], draft_scores: list[torch.Tensor], logits: torch.Tensor
    ) -> tuple[int, int]:
        """How many drafts the full model accepts, and the token it puts after them."""
        if not d.config.sample and not d.processors:
            targets = greedy(logits).tolist()
            n = 0
            while n < len(drafts) and drafts[n] == targets[n]:
                n += 1
            return n, targets[n]
        for i, draft in enumerate(drafts):
            scores = d.scores(logits[i], drafts[:i])
            if not d.config.sample:
                target = int(greedy(scores))
                if target != draft:
                    return i, target
                continue
            p, q = probabilities(scores), probabilities(draft_scores[i])
            if not accept_draft(p, q, draft, d.generator):
                return i, sample(residual(p, q), d.generator)
        return len(drafts), d.choose(d.scores(logits[len(drafts)], drafts))


STRATEGIES: dict[str, Callable[[], object]] = {
    "autoregressive": Autoregressive,
    "self_speculative": SelfSpeculative,
}
