"""Generation strategies, in a table. Each one owns everything specific to it (see `Strategy`); the decoding loop
(generator.py), the benchmark and the cost model call these methods and never ask which strategy they run.

Adding a strategy is one class here and one entry in `STRATEGIES`; the greedy-equivalence tests run over every
entry (a `lossless` strategy must equal autoregressive decoding token for token).
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Cache, LogitsProcessorList, PreTrainedModel

from . import layers
from .config import GenerationConfig
from .costs import PassCosts
from .errors import UsageError
from .sampling import accept_draft, greedy, probabilities, residual, sample


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
    compiled: layers.CompiledPasses | None = None  # --compile: the passes run through torch.compile

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


class Strategy:
    """What a generation strategy provides.

    Settings:
    - `configure(config, model_config)`: the configuration checked and completed for a model (the checkpoint's
      recommended `layerskip` settings fill the flags left at -1); bad settings raise UsageError naming the flag.
      It may hand over to another strategy by renaming `generation_strategy` (see `configured`).
    - `own(config)`: the configuration without the flags this strategy does not use, for a benchmark that passes
      one set of flags to several strategies.

    Resources:
    - `passes(config, num_layers)`: the passes a step makes, (start layer, end layer, new tokens): what --compile
      compiles.
    - `cache_room(config, budget)`: cache positions needed beyond the prompt and the token budget.
    - `output_layer(config, num_layers)`: the layer whose logits are the distribution the strategy samples from
      (where lm-eval scores log-likelihoods).
    - `step_seconds(costs, drafts)`: the cost model: the time of one step from measured pass costs, `drafts`
      being the mean number of tokens drafted per step. `ideal_speedup` turns it into a speedup.

    Decoding:
    - `prefill(decoding, prompt)` runs the prompt (1, T) and returns the logits (V,) of the first new token.
    - `step(decoding, budget)` takes the newest token (not yet in the cache) and returns between 1 and `budget`
      new tokens.
    - `prefill_rows(rows, padded, lengths)` and `step_rows(rows, cache, budgets)` do the same for a batch: one
      `Decoding` per row over one shared `layers.RaggedCache`; every row's tokens are what it gets alone.

    `lossless`: the greedy output equals greedy autoregressive output token for token, and sampling draws from the
    full model's distribution."""

    name: str
    lossless: bool

    def configure(self, config: GenerationConfig, model_config) -> GenerationConfig:
        raise NotImplementedError

    def own(self, config: GenerationConfig) -> GenerationConfig:
        raise NotImplementedError

    def passes(self, config: GenerationConfig, num_layers: int) -> set[tuple[int, int, int]]:
        raise NotImplementedError

    def cache_room(self, config: GenerationConfig, budget: int) -> int:
        raise NotImplementedError

    def output_layer(self, config: GenerationConfig, num_layers: int) -> int:
        raise NotImplementedError

    def step_seconds(self, costs: PassCosts, drafts: float) -> float:
        raise NotImplementedError

    def prefill(self, d: Decoding, prompt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, d: Decoding, budget: int) -> StepResult:
        raise NotImplementedError

    def prefill_rows(self, rows: list[Decoding], padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts through the layers the strategy's output comes from (every strategy's prefill is
        that pass): the logits (B, V) after each row's prompt."""
        first = rows[0]
        return layers.ragged_prefill(first.model, padded, first.cache,
                                     self.output_layer(first.config, layers.num_layers(first.model)), lengths)

    def step_rows(self, rows: list[Decoding], cache: layers.RaggedCache, budgets: list[int]) -> list[StepResult]:
        raise NotImplementedError

    def ideal_speedup(self, costs: PassCosts, steps: int, drafted: int, accepted: int) -> float:
        """The speedup over autoregressive decoding with no overhead beyond the passes, for the measured counts:
        tokens per step × an autoregressive token's time / a step's time."""
        if steps == 0:
            return 1.0
        token = Autoregressive().step_seconds(costs, 0.0)
        return (accepted + steps) * token / (steps * self.step_seconds(costs, drafted / steps))


def _choose_rows(rows: list[Decoding], logits: torch.Tensor, drafts: list[list[int]]) -> tuple[list[int], list]:
    """Each row's token from its logits (B, V) after its drafts so far, and the scores it was chosen from (None
    where greedy decoding needs none: one argmax for the whole batch)."""
    first = rows[0]
    if not first.config.sample and not first.processors:
        return greedy(logits).tolist(), [None] * len(rows)
    scores = [row.scores(logits[b], drafts[b]) for b, row in enumerate(rows)]
    return [row.choose(s) for row, s in zip(rows, scores)], scores


def _newest(rows: list[Decoding]) -> torch.Tensor:
    return torch.tensor([[row.sequence[-1]] for row in rows], device=rows[0].model.lm_head.weight.device)  # (B, 1)


def _flag_or_recommended(config: GenerationConfig, model_config, name: str) -> int:
    """A flag's value, or where it was left at -1 the checkpoint's recommendation (`layerskip` in its config)."""
    value = getattr(config, name)
    return value if value != -1 else (getattr(model_config, "layerskip", None) or {}).get(name, -1)


class Autoregressive(Strategy):
    """One token per step from the full model. With --exit_layer set it is plain early exit (the reference
    toolkit's spelling of it), which `configure` hands over to `early_exit`."""

    name, lossless = "autoregressive", True

    def configure(self, config, model_config):
        if config.exit_layer != -1:
            return dataclasses.replace(config, generation_strategy="early_exit")
        return config

    def own(self, config):
        return dataclasses.replace(config, generation_strategy=self.name, exit_layer=-1, num_speculations=-1)

    def depth(self, config: GenerationConfig, num_layers: int) -> int:
        """How many layers compute each token."""
        return num_layers

    def passes(self, config, num_layers):
        return {(0, self.depth(config, num_layers), 1)}

    def cache_room(self, config, budget):
        return 1

    def output_layer(self, config, num_layers):
        return self.depth(config, num_layers)

    def step_seconds(self, costs, drafts):
        return costs.full + costs.head[1]

    def logits(self, d: Decoding, token_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """(B, V) after the last of `token_ids` (B, T), from the strategy's layers."""
        num_layers = layers.num_layers(d.model)
        depth = self.depth(d.config, num_layers)
        if depth < num_layers:
            return layers.early_exit(d.model, token_ids, cache, depth, last_only=True, compiled=d.compiled).logits[:, -1]
        return layers.full_forward(d.model, token_ids, cache, last_only=True, compiled=d.compiled)[:, -1]

    def prefill(self, d, prompt):
        return self.logits(d, prompt, d.cache)[0]

    def step(self, d, budget):
        return StepResult([d.choose(d.scores(self.logits(d, d.ids(d.sequence[-1]), d.cache)[0], []))])

    def step_rows(self, rows, cache, budgets):
        tokens, _ = _choose_rows(rows, self.logits(rows[0], _newest(rows), cache), [[] for _ in rows])
        return [StepResult([token]) for token in tokens]


class EarlyExit(Autoregressive):
    """One token per step from the first `exit_layer` layers, the final norm and the head: fast, and lossy (its
    output is not the full model's)."""

    name, lossless = "early_exit", False

    def configure(self, config, model_config):
        num_layers = model_config.num_hidden_layers
        exit_layer = _flag_or_recommended(config, model_config, "exit_layer")
        if exit_layer < 1:
            raise UsageError("--exit_layer must be >= 1 for early_exit; this model recommends none")
        if exit_layer > num_layers:
            raise UsageError(f"--exit_layer must be in [1, {num_layers}] for this {num_layers}-layer model "
                             f"(got {exit_layer})")
        return dataclasses.replace(config, exit_layer=exit_layer)

    def own(self, config):
        return dataclasses.replace(config, generation_strategy=self.name, num_speculations=-1)

    def depth(self, config, num_layers):
        return config.exit_layer

    def step_seconds(self, costs, drafts):
        return costs.draft + costs.head[1]


class SelfSpeculative(Strategy):
    """Draft with layers [0, E), verify every draft in one pass of layers [E, L) over their cached exit-layer
    hidden states, keep the longest agreeing prefix plus one token of the full model."""

    name, lossless = "self_speculative", True

    def configure(self, config, model_config):
        num_layers = model_config.num_hidden_layers
        config = dataclasses.replace(config, exit_layer=_flag_or_recommended(config, model_config, "exit_layer"),
                                     num_speculations=_flag_or_recommended(config, model_config, "num_speculations"))
        if config.exit_layer < 1:
            raise UsageError("--exit_layer must be >= 1 for self_speculative; this model recommends none")
        if config.num_speculations < 1:
            raise UsageError("--num_speculations must be >= 1 for self_speculative; this model recommends none")
        if config.exit_layer >= num_layers:
            raise UsageError(f"--exit_layer must be in [1, {num_layers - 1}] for self_speculative with this "
                             f"{num_layers}-layer model (got {config.exit_layer})")
        return config

    def own(self, config):
        return dataclasses.replace(config, generation_strategy=self.name)

    def passes(self, config, num_layers):
        """Drafting one token at a time, verifying a full draft (a shorter one, at a stop token or at the end of
        the budget, runs uncompiled)."""
        return {(0, config.exit_layer, 1), (config.exit_layer, num_layers, config.num_speculations + 1)}

    def cache_room(self, config, budget):
        return min(config.num_speculations, budget) + 1  # one step's drafts, never more than the budget

    def output_layer(self, config, num_layers):
        return num_layers

    def step_seconds(self, costs, drafts):
        """A step with k drafts runs layers [0, E) over one position k + 1 times (k drafts, then the last draft's
        exit hidden state), layers [E, L) once over k + 1 positions, the head k times over one position and once
        over k + 1."""
        k = drafts
        return (k + 1) * costs.draft + costs.at(costs.verify, k + 1) + k * costs.head[1] + costs.at(costs.head, k + 1)

    def prefill(self, d, prompt):
        return layers.full_forward(d.model, prompt, d.cache, last_only=True, compiled=d.compiled)[0, -1]

    def step(self, d, budget):
        exit_layer = d.config.exit_layer
        drafts, draft_scores, exit_hiddens = [], [], []
        token = d.sequence[-1]
        for _ in range(min(d.config.num_speculations, budget - 1)):
            out = layers.early_exit(d.model, d.ids(token), d.cache, exit_layer, compiled=d.compiled)
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
        exit_hiddens.append(layers.exit_hidden(d.model, d.ids(token), d.cache, exit_layer, d.compiled))
        logits = layers.remainder(d.model, torch.cat(exit_hiddens, dim=1), d.cache, exit_layer, d.compiled)[0]  # (D+1, V)
        accepted, final = self.verify(d, drafts, draft_scores, logits)
        layers.rollback(d.cache, len(drafts) - accepted)
        return StepResult(drafts[:accepted] + [final], drafted=len(drafts), accepted=accepted)

    def step_rows(self, rows, cache, budgets):
        """`step` for a batch: every row drafts as many tokens (up to the largest budget; a row's tokens past its
        own budget or a stop token are dropped by the caller), one verification pass over all rows, and each row
        keeps its own agreeing prefix."""
        model, exit_layer, compiled = rows[0].model, rows[0].config.exit_layer, rows[0].compiled
        count = min(rows[0].config.num_speculations, max(budgets) - 1)
        drafts, draft_scores, exit_hiddens = [[] for _ in rows], [[] for _ in rows], []
        current = _newest(rows)
        for _ in range(count):
            out = layers.early_exit(model, current, cache, exit_layer, compiled=compiled)
            exit_hiddens.append(out.hidden)
            tokens, scores = _choose_rows(rows, out.logits[:, -1], drafts)
            for b, (token, score) in enumerate(zip(tokens, scores)):
                drafts[b].append(token)
                draft_scores[b].append(score)
            current = torch.tensor([[t] for t in tokens], device=current.device)
        exit_hiddens.append(layers.exit_hidden(model, current, cache, exit_layer, compiled))
        hiddens = torch.cat(exit_hiddens, dim=1)  # (B, count + 1, H)
        logits = layers.remainder(model, hiddens, cache, exit_layer, compiled)  # (B, count + 1, V)
        results, rejected = [], []
        for b, row in enumerate(rows):
            accepted, final = self.verify(row, drafts[b], draft_scores[b], logits[b])
            rejected.append(count - accepted)
            # counted as alone: the drafts up to its budget and its first stop token (the rest is dropped)
            own = self._own_drafts(drafts[b], budgets[b], row.stop_ids)
            results.append(StepResult(drafts[b][:accepted] + [final], drafted=own, accepted=min(accepted, own)))
        cache.rollback_rows(torch.tensor(rejected))
        return results

    @staticmethod
    def _own_drafts(drafts: list[int], budget: int, stop_ids: frozenset[int]) -> int:
        """How many of a batch row's drafts it would have drafted alone (`step` stops at its budget and after a
        stop token)."""
        own = min(len(drafts), budget - 1)
        return next((i + 1 for i, token in enumerate(drafts[:own]) if token in stop_ids), own)

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
            if not accept_draft(p, q, draft, d.generator):  # q <= p: always accepted
                return i, sample(residual(p, q), d.generator)
        return len(drafts), d.choose(d.scores(logits[len(drafts)], drafts))


STRATEGIES: dict[str, type[Strategy]] = {
    "autoregressive": Autoregressive,
    "early_exit": EarlyExit,
    "self_speculative": SelfSpeculative,
}


def configured(config: GenerationConfig, model_config) -> tuple[Strategy, GenerationConfig]:
    """The strategy the configuration names and the configuration as it completes it for this model (following a
    hand-over: autoregressive with --exit_layer is early_exit)."""
    if config.generation_strategy not in STRATEGIES:
        raise UsageError(f"--generation_strategy must be one of {', '.join(STRATEGIES)} "
                         f"(got {config.generation_strategy!r})")
    config.check_vocabulary(model_config.vocab_size)
    strategy = STRATEGIES[config.generation_strategy]()
    completed = strategy.configure(config, model_config)
    if completed.generation_strategy != strategy.name:
        return configured(completed, model_config)
    return strategy, completed
