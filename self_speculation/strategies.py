"""Generation strategies, in a table. Each one owns everything specific to it (see `Strategy`); the decoding loop
(generator.py), the benchmark and the cost model call these methods and never ask which strategy they run.

Adding a strategy is one class here and one entry in `STRATEGIES`; the greedy-equivalence tests run over every
entry (a `lossless` strategy must equal autoregressive decoding token for token).
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from . import layers
from .config import GenerationConfig
from .costs import PassCosts, measure_pass_costs
from .errors import UsageError
from .sampling import accept_draft, greedy, probabilities, residual, sample


@dataclass
class Decoding:
    """The state of one generation of B rows (one prompt: B = 1), shared by the decoding loop and the strategy:
    the model's decoder, the configuration, one cache, and per row its sequence."""

    decoder: layers.Decoder
    config: GenerationConfig
    cache: layers.KVCache
    sequences: list[list[int]]  # per row: prompt and generated tokens; the last one is not in the cache yet
    processors: LogitsProcessorList
    generator: torch.Generator | None
    stop_ids: frozenset[int]  # drafting ends at these
    on_draft: Callable[[int], None] | None = None  # one row only: shown as drafted
    compiled: layers.CompiledPasses | None = None  # --compile: the passes run through torch.compile

    def newest(self) -> torch.Tensor:
        return torch.tensor([[s[-1]] for s in self.sequences], device=self.decoder.device)  # (B, 1)

    def keep_rows(self, rows: list[int]) -> None:
        """Only `rows` go on (the others have stopped): in the cache and here."""
        self.cache.keep_rows(rows)
        self.sequences = [self.sequences[b] for b in rows]

    def scores(self, b: int, logits: torch.Tensor, drafts: list[int]) -> torch.Tensor:
        """Row b's processed scores (V,) for the position after its sequence and `drafts`."""
        if not self.processors:
            return logits
        context = torch.tensor([self.sequences[b] + drafts], device=logits.device)  # (1, T)
        return self.processors(context, logits[None])[0]

    def choose(self, scores: torch.Tensor) -> int:
        if self.config.sample:
            return sample(probabilities(scores), self.generator)
        return int(greedy(scores))

    def choose_rows(self, logits: torch.Tensor, drafts: list[list[int]]) -> tuple[list[int], list]:
        """Each row's token from its logits (B, V) after its drafts so far, and the scores it was chosen from
        (None where greedy decoding needs none: one argmax for the whole batch, one read of the device)."""
        if not self.config.sample and not self.processors:
            return greedy(logits).tolist(), [None] * len(self.sequences)
        scores = [self.scores(b, logits[b], drafts[b]) for b in range(len(self.sequences))]
        return [self.choose(s) for s in scores], scores


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

    Decoding, over the rows of a `Decoding` (one prompt is a batch of one):
    - `prefill(decoding, padded, lengths)` runs the right-padded prompts (B, T) and returns the logits (B, V) of
      each row's first new token.
    - `step(decoding, budgets)` takes each row's newest token (not yet in the cache) and returns per row between
      1 and budgets[b] new tokens; every row's tokens, drafts and acceptances are what it gets alone.

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

    def prefill(self, d: Decoding, padded: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Every strategy's prefill is one pass through the layers its output comes from."""
        return d.decoder.prefill(padded, d.cache, self.output_layer(d.config, d.decoder.num_layers), lengths)

    def step(self, d: Decoding, budgets: list[int]) -> list[StepResult]:
        raise NotImplementedError

    def metrics(self, model, metrics: dict, samples: list, settings: dict, context: int) -> dict:
        """What a benchmark reports of this strategy beyond the common metrics (`metrics` holds every strategy's),
        from its samples and effective settings; pass costs are measured at `context` cached positions."""
        return {}

    def report_lines(self, m: dict) -> list[str]:
        """Lines under the benchmark's table for this strategy's metrics `m`."""
        return []

    def ideal_speedup(self, costs: PassCosts, steps: int, drafted: int, accepted: int) -> float:
        """The speedup over autoregressive decoding with no overhead beyond the passes, for the measured counts:
        tokens per step × an autoregressive token's time / a step's time."""
        if steps == 0:
            return 1.0
        token = Autoregressive().step_seconds(costs, 0.0)
        return (accepted + steps) * token / (steps * self.step_seconds(costs, drafted / steps))


def draft_share(num_speculations: int, budget: int) -> int:
    """How many tokens a step drafts with `budget` tokens left: never past the budget, since the verifier adds one."""
    return min(num_speculations, budget - 1)


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

    def step(self, d, budgets):
        depth = self.depth(d.config, d.decoder.num_layers)
        hidden = d.decoder.run_layers(d.decoder.embed(d.newest()), d.cache, 0, depth, d.compiled)
        tokens, _ = d.choose_rows(d.decoder.head(hidden)[:, -1], [[] for _ in d.sequences])
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

    def step(self, d, budgets):
        """Every row drafts with layers [0, E) until it has drafted its own share (up to `num_speculations`, never
        past its budget, ending after a stop token) or all rows have; one pass of layers [E, L) verifies every
        row's drafts over their cached exit-layer hidden states; each row keeps its own agreeing prefix. A row's
        drafts past its share (drafted alongside others) are not counted, and the caller drops its tokens past
        its budget or a stop token: it gets what it gets alone."""
        decoder, exit_layer, rows = d.decoder, d.config.exit_layer, range(len(d.sequences))
        shares = [draft_share(d.config.num_speculations, budget) for budget in budgets]
        drafts, draft_scores, exit_hiddens = [[] for _ in rows], [[] for _ in rows], []
        current, drafting = d.newest(), [share > 0 for share in shares]
        while any(drafting):
            out = decoder.early_exit(current, d.cache, exit_layer, compiled=d.compiled)
            exit_hiddens.append(out.hidden)
            tokens, scores = d.choose_rows(out.logits[:, -1], drafts)
            for b, (token, score) in enumerate(zip(tokens, scores)):
                drafts[b].append(token)
                draft_scores[b].append(score)
                drafting[b] = drafting[b] and len(drafts[b]) < shares[b] and token not in d.stop_ids
            if d.on_draft is not None:
                d.on_draft(tokens[0])
            current = torch.tensor([[t] for t in tokens], device=current.device)
        # The last draft (or, with no drafts, the newest token) has not been through layers [0, E) yet.
        exit_hiddens.append(decoder.exit_hidden(current, d.cache, exit_layer, d.compiled))
        logits = decoder.remainder(torch.cat(exit_hiddens, dim=1), d.cache, exit_layer, d.compiled)  # (B, D+1, V)
        results, rejected = [], []
        for b in rows:
            accepted, final = self.verify(d, b, drafts[b], draft_scores[b], logits[b])
            rejected.append(len(drafts[b]) - accepted)
            own = self._own_drafts(drafts[b], shares[b], d.stop_ids)
            results.append(StepResult(drafts[b][:accepted] + [final], drafted=own, accepted=min(accepted, own)))
        d.cache.rollback(rejected)
        return results

    def metrics(self, model, metrics, samples, settings, context):
        """The ideal speedup for the measured acceptance and this machine's pass costs, the measured speedup over
        our autoregressive decoding (same layer code, so the ratio is the speculation's own gain), the efficiency
        (measured / ideal) and the KV cache against autoregressive decoding's."""
        drafts = draft_share(settings["num_speculations"], settings["max_steps"])
        costs = measure_pass_costs(model, context, settings["exit_layer"], drafts + 1,
                                   compiled=settings.get("compile", False))
        ideal = self.ideal_speedup(costs, steps=sum(s.passes - 1 for s in samples),
                                   drafted=sum(s.drafted for s in samples), accepted=sum(s.accepted for s in samples))
        report = {"ideal_speedup_vs_autoregressive": ideal,
                  "pass_costs_seconds": dataclasses.asdict(costs) | {"context": context}}
        plain, mine = metrics.get(Autoregressive.name), metrics[self.name]
        if plain:
            speedup = mine["tokens_per_second_median"] / plain["tokens_per_second_median"]
            report |= {"speedup_vs_autoregressive": speedup, "efficiency": speedup / ideal}
            for key, name in (("kv_cache_bytes_max", "kv_cache"), ("peak_gpu_bytes_max", "peak_gpu_memory")):
                if mine[key] and plain[key]:
                    report[f"{name}_vs_autoregressive"] = mine[key] / plain[key]
        return report

    def report_lines(self, m):
        """The speculation's own gain against its ideal, and its memory."""
        lines = [f"{self.name}: ideal speedup over autoregressive {m['ideal_speedup_vs_autoregressive']:.2f}x "
                 "(acceptance and pass costs measured here; model in README)"]
        if "speedup_vs_autoregressive" in m:
            lines[0] += f", measured {m['speedup_vs_autoregressive']:.2f}x, efficiency {100 * m['efficiency']:.0f}%"
        if "kv_cache_vs_autoregressive" in m:
            lines.append(f"{self.name}: KV cache {m['kv_cache_bytes_max'] / 2**20:.2f} MiB, "
                         f"{m['kv_cache_vs_autoregressive']:.2f}x autoregressive's")
        if "peak_gpu_memory_vs_autoregressive" in m:
            lines.append(f"{self.name}: peak GPU memory {m['peak_gpu_memory_vs_autoregressive']:.2f}x "
                         "autoregressive's")
        return lines

    @staticmethod
    def _own_drafts(drafts: list[int], share: int, stop_ids: frozenset[int]) -> int:
        """How many of a row's drafts it would have drafted alone: its share, ending after a stop token."""
        own = min(len(drafts), share)
        return next((i + 1 for i, token in enumerate(drafts[:own]) if token in stop_ids), own)

    @staticmethod
    def verify(d: Decoding, b: int, drafts: list[int], draft_scores: list, logits: torch.Tensor) -> tuple[int, int]:
        """How many of row b's drafts the full model accepts, and the token it puts after them."""
        if not d.config.sample and not d.processors:
            targets = greedy(logits).tolist()
            n = 0
            while n < len(drafts) and drafts[n] == targets[n]:
                n += 1
            return n, targets[n]
        for i, draft in enumerate(drafts):
            scores = d.scores(b, logits[i], drafts[:i])
            if not d.config.sample:
                target = int(greedy(scores))
                if target != draft:
                    return i, target
                continue
            p, q = probabilities(scores), probabilities(draft_scores[i])
            if not accept_draft(p, q, draft, d.generator):  # q <= p: always accepted
                return i, sample(residual(p, q), d.generator)
        return len(drafts), d.choose(d.scores(b, logits[len(drafts)], drafts))


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
