"""Generation strategies, in a table. Each one owns everything specific to it (see `Strategy`); the decoding loop
(generator.py), the benchmark and the cost model call these methods and never ask which strategy they run.

Adding a strategy is one class here and one entry in `STRATEGIES`; the greedy-equivalence tests run over every
entry (a `lossless` strategy must equal autoregressive decoding token for token).
"""

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import drafting, layers
from .config import GenerationConfig
from .costs import PassCosts
from .drafting import POLICIES, DraftPolicy, draft_share
from .errors import UsageError
from .sampling import Processing, first_rejection, greedy, probabilities, race_noise, sample


@dataclass
class Decoding:
    """The state of one generation of B rows (one prompt: B = 1), shared by the decoding loop and the strategy:
    the model's decoder, the configuration, one cache, and per row its sequence on the host and its newest token
    on the device. Tokens are chosen on the device; a step reads the device once, at its end (`read`)."""

    decoder: layers.Decoder
    config: GenerationConfig
    cache: layers.KVCache
    sequences: list[list[int]]  # per row: prompt and generated tokens; the last one is not in the cache yet
    processing: Processing
    streams: torch.Tensor | None  # (B,) when sampling: each row's noise key (`sampling.race_noise`)
    stop_ids: frozenset[int]  # drafting ends at these
    on_draft: Callable[[int], None] | None = None  # one row only: shown as drafted (a device read per draft)
    compiled: layers.CompiledPasses | None = None  # --compile: the passes run through torch.compile
    current: torch.Tensor | None = None  # (B, 1) each row's newest token, on the device
    plans: list | None = None  # per row, what a strategy keeps of it across steps (self_speculative: its draft plan)
    idle: list[bool] | None = None  # per row: stopped, but kept in the batch (its steps are not kept)

    def keep_rows(self, rows: list[int]) -> None:
        """Only `rows` go on (the others have stopped): in the cache and here."""
        index = layers.upload(rows, self.current.device)
        self.cache.keep_rows(rows, index)
        self.sequences = [self.sequences[b] for b in rows]
        if self.plans is not None:
            self.plans = [self.plans[b] for b in rows]
        self.current = self.current.index_select(0, index)
        if self.streams is not None:
            self.streams = self.streams.index_select(0, index)

    def noise(self, ahead: int, count: int) -> torch.Tensor | None:
        """When sampling, the race noise (B, count, V) of the tokens at `ahead`.. positions past every row's
        cached length (`sampling.race_noise`): a position's noise, whatever drafts or verifies it. None when
        greedy."""
        if not self.config.sample:
            return None
        positions = self.cache.lengths[:, None] + torch.arange(ahead, ahead + count, device=self.cache.lengths.device)
        return race_noise(self.streams, positions, self.decoder.vocab_size)

    def commit(self, counts: list[int], on_device: torch.Tensor | None = None) -> None:
        """The end of a step: row b keeps the first counts[b] positions it wrote (`on_device`: the same counts
        where the device has them, used where rows differ); an idle row keeps none."""
        if self.idle is not None and any(self.idle):
            counts, on_device = [0 if idle else count for count, idle in zip(counts, self.idle)], None
        self.cache.commit(counts, on_device)

    def contexts(self):
        """What the processors see of every row before this step's drafts: (B, T) or one (T_b,) per row, on the
        device; None where no processor looks at the sequence."""
        if self.processing.ngram is None:
            return None
        device = self.decoder.device
        if len({len(s) for s in self.sequences}) == 1:
            return torch.tensor(self.sequences, device=device)
        return [torch.tensor(s, device=device) for s in self.sequences]

    def scores(self, logits: torch.Tensor, contexts, drafts: torch.Tensor) -> torch.Tensor:
        """Every row's processed scores (B, V) for the position after its sequence and `drafts` (B, i)."""
        if not self.processing:
            return logits
        if isinstance(contexts, torch.Tensor):
            contexts = torch.cat([contexts, drafts], dim=1)
        elif contexts is not None:
            contexts = [torch.cat([c, row]) for c, row in zip(contexts, drafts)]
        return self.processing(contexts, logits)

    def distribution(self, scores: torch.Tensor) -> torch.Tensor:
        """What a token is chosen from (..., V): the probabilities when sampling, else the scores themselves."""
        return probabilities(scores) if self.config.sample else scores

    def choose(self, scores: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Each row's token (...) from its scores (..., V): sampled with `noise` (`Decoding.noise`), or the
        argmax."""
        distribution = self.distribution(scores)
        return sample(distribution, noise) if self.config.sample else greedy(distribution)

    def scores_after(self, logits: torch.Tensor, contexts, drafts: torch.Tensor) -> torch.Tensor:
        """Every row's processed scores (B, D + 1, V) at each position of its drafts (B, D) and the one after them,
        from the verifier's logits there: the warpers in one call over every position, the n-gram rule position by
        position (it sees each one's own context)."""
        if not self.processing:
            return logits
        if self.processing.ngram is None:
            return self.processing(None, logits.flatten(0, 1)).view_as(logits)
        return torch.stack([self.scores(logits[:, i], contexts, drafts[:, :i]) for i in range(logits.shape[1])], 1)

    def take(self, logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits (B, V) after its sequence (all of it in the cache): chosen, kept
        as `current`, and read."""
        noise = self.noise(0, 1)
        scores = self.scores(logits, self.contexts(), self.no_drafts())
        self.current = self.choose(scores, None if noise is None else noise[:, 0])[:, None]
        return read(self.current[:, 0])

    def no_drafts(self) -> torch.Tensor:
        return torch.empty((len(self.sequences), 0), dtype=torch.long, device=self.decoder.device)


def read(tensor: torch.Tensor) -> list:
    """The one device-to-host read of a decoding step: its results, for the stop checks and the output."""
    return tensor.tolist()


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
    - `step_seconds(costs, drafts)`: the cost model: the time of one step of `drafts` drafts from measured pass
      costs. `predicted_seconds` sums it over a generation's steps, `ideal_speedup` turns that into a speedup.

    Decoding, over the rows of a `Decoding` (one prompt is a batch of one):
    - `prefill(decoding, padded, lengths)` runs the right-padded prompts (B, T) and returns the logits (B, V) of
      each row's first new token.
    - `step(decoding, budgets)` takes each row's newest token (not yet in the cache) and returns per row between
      1 and budgets[b] new tokens; every row's tokens, drafts and acceptances are what it gets alone.

    `lossless`: the greedy output equals greedy autoregressive output token for token, and sampling draws from the
    full model's distribution."""

    name: str
    lossless: bool
    full_model = True  # every step (and the prompt) ends in a pass through every layer
    flags: frozenset[str] = frozenset()  # the strategy flags (STRATEGY_FLAGS) it reads

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

    def timed_passes(self, config: GenerationConfig) -> tuple[int | None, int]:
        """What its cost model needs timed beside the full pass: (exit layer or None, most positions verified)."""
        return None, 1

    def begin(self, generator, rows: int, context: int) -> list | None:
        """A generation of `rows` rows by `generator` (its decoder, configuration, compiled passes) begins, about
        `context` positions deep; before its clock starts. Returns what the strategy keeps per row across its
        steps (`Decoding.plans`), or None."""
        return None

    def metrics(self, mine: dict, plain: dict | None, batches: list[list], costs: PassCosts | None) -> dict:
        """What a benchmark reports of this strategy beyond the common metrics `mine`, from its samples by the
        batch they were generated in (`reporting.by_batch`), our
        autoregressive decoding's metrics in the same run and mode (`plain`, or None) and the pass costs timed
        beside the run (`costs.CostMeter`, at the batches' sizes): the measured time per token after the first
        against what its passes alone predict, and the overhead between them."""
        if costs is None:
            return {}
        measured = predicted = tokens = 0.0
        for rows in batches:
            measured += rows[0].total_time - (rows[0].time_to_first_token or 0.0)
            # the row that ran longest was in every step of its batch, which drafted as much as it did (or, at
            # the end of its budget, a little more)
            predicted += self.predicted_seconds(costs, max(rows, key=lambda s: s.steps).step_drafts)
            tokens += sum(len(s.tokens) - 1 for s in rows)
        if not tokens or not predicted:
            return {}
        return {"ms_per_token_after_first": 1000 * measured / tokens,
                "predicted_ms_per_token_after_first": 1000 * predicted / tokens,
                "overhead_vs_passes": measured / predicted - 1}

    def report_lines(self, name: str, m: dict) -> list[str]:
        """Lines under the benchmark's table for this strategy's metrics `m`, shown as `name`."""
        if "predicted_ms_per_token_after_first" not in m:
            return []
        return [f"{name}: {m['ms_per_token_after_first']:.3f} ms/token after the first, its passes alone "
                f"{m['predicted_ms_per_token_after_first']:.3f} (overhead {100 * m['overhead_vs_passes']:+.0f}%)"]

    def predicted_seconds(self, costs: PassCosts, step_drafts: dict[int, int]) -> float:
        """The cost model's time of the steps `step_drafts` counts (drafts in a step -> steps), each priced at
        its own length: a policy that varies the length is not priced at its mean."""
        return sum(steps * self.step_seconds(costs, drafts) for drafts, steps in step_drafts.items())

    def ideal_speedup(self, costs: PassCosts, step_drafts: dict[int, int], tokens: int) -> float:
        """The speedup over autoregressive decoding with no overhead beyond the passes: the time of `tokens`
        autoregressive steps over the predicted time of the steps `step_drafts` counts, which yielded them."""
        seconds = self.predicted_seconds(costs, step_drafts)
        return tokens * Autoregressive().step_seconds(costs, 0) / seconds if seconds else 1.0


# Settings the LayerSkip authors published for their checkpoints, which carry no `layerskip` key of ours: the
# paper's (Elhoushi et al., ACL 2024) self-speculative results after continual pretraining, Llama2 7B at E8 d6 on
# HumanEval (also the reference toolkit's example command) and Llama2 13B at E15 d12 on CNN/DM. Other models: none.
PUBLISHED = {
    "facebook/layerskip-llama2-7b": {"exit_layer": 8, "num_speculations": 6},
    "facebook/layerskip-llama2-13b": {"exit_layer": 15, "num_speculations": 12},
}
CHOOSE = " (exits.py predicts the best settings from a few prompts, sweep.py measures a grid)"


def _published(model_config) -> str | None:
    """The PUBLISHED id of a checkpoint named like one there (the hub id, or a local copy in a directory of that
    name), or None."""
    name = (getattr(model_config, "_name_or_path", None) or "").rstrip("/").lower().rsplit("/", 1)[-1]
    return next((model_id for model_id in PUBLISHED if model_id.split("/")[1] == name), None)


def _flag_or_recommended(config: GenerationConfig, model_config, name: str) -> tuple[int, str]:
    """A flag's value, or where it was left at -1 the checkpoint's recommendation (`layerskip` in its config.json,
    else the settings published for it: PUBLISHED), and what an error about the value names: the flag, or where
    the recommendation comes from. A `layerskip` that is not an object of integers (a file edited by hand) is
    refused, naming the file."""
    value, recommended = getattr(config, name), getattr(model_config, "layerskip", None)
    if value != -1:
        return value, f"--{name}"
    if recommended is None:
        model_id = _published(model_config)
        if model_id is None:
            return -1, f"--{name}"
        value = PUBLISHED[model_id][name]
        return value, f"{name} {value}, published for {model_id} by the LayerSkip paper (set --{name})"
    where = f"{getattr(model_config, '_name_or_path', None) or 'the model'}/config.json"
    if not isinstance(recommended, dict) or any(type(recommended.get(key, -1)) is not int
                                                 for key in ("exit_layer", "num_speculations")):
        raise UsageError(f"{where}: `layerskip` must be an object of integers (exit_layer, num_speculations); "
                         f"got {recommended!r}")
    value = recommended.get(name, -1)
    return value, (f"--{name}" if value == -1 else f"{name} {value}, recommended by {where} (set --{name})")


def one_token(d: Decoding, depth: int) -> list[StepResult]:
    """A step of one token per row from layers [0, depth), the final norm and the head."""
    hidden = d.decoder.run_layers(d.decoder.embed(d.current), d.cache, 0, depth, d.compiled)
    d.commit([1] * hidden.shape[0])  # the newest token is in the cache: the next one's position is its length
    return [StepResult([token]) for token in d.take(d.decoder.head(hidden)[:, -1])]


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
        return one_token(d, self.depth(d.config, d.decoder.num_layers))


class EarlyExit(Autoregressive):
    """One token per step from the first `exit_layer` layers, the final norm and the head: fast, and lossy (its
    output is not the full model's)."""

    name, lossless, full_model = "early_exit", False, False
    flags = frozenset({"exit_layer"})

    def configure(self, config, model_config):
        num_layers = model_config.num_hidden_layers
        exit_layer, source = _flag_or_recommended(config, model_config, "exit_layer")
        if exit_layer == -1:
            raise UsageError(f"--exit_layer must be >= 1 for early_exit; this model recommends none{CHOOSE}")
        if not 1 <= exit_layer <= num_layers:
            raise UsageError(f"{source} must be in [1, {num_layers}] for this {num_layers}-layer model "
                             f"(got {exit_layer})")
        return dataclasses.replace(config, exit_layer=exit_layer)

    def own(self, config):
        return dataclasses.replace(config, generation_strategy=self.name, num_speculations=-1)

    def depth(self, config, num_layers):
        return config.exit_layer

    def timed_passes(self, config):
        return config.exit_layer, 1

    def step_seconds(self, costs, drafts):
        return costs.draft + costs.head[1]


class SelfSpeculative(Strategy):
    """Draft with layers [0, E), verify every draft in one pass of layers [E, L) over their cached exit-layer
    hidden states, keep the longest agreeing prefix plus one token of the full model."""

    name, lossless = "self_speculative", True
    flags = frozenset({"exit_layer", "num_speculations", "batch_drafts", "draft_policy"})

    def __init__(self, policy: DraftPolicy | None = None):
        self.policy = policy  # how many tokens each step drafts: set by `configure` unless given
        self.trail: list[tuple[int, bool]] = []  # the last generation's steps: (drafts, shadow draft)

    def configure(self, config, model_config):
        num_layers = model_config.num_hidden_layers
        (exit_layer, exit_source), (drafts, drafts_source) = (
            _flag_or_recommended(config, model_config, name) for name in ("exit_layer", "num_speculations"))
        if exit_layer == -1:
            raise UsageError(f"--exit_layer must be >= 1 for self_speculative; this model recommends none{CHOOSE}")
        if drafts == -1:
            raise UsageError("--num_speculations must be >= 1 for self_speculative; this model recommends "
                             f"none{CHOOSE}")
        if not 1 <= exit_layer < num_layers:
            raise UsageError(f"{exit_source} must be in [1, {num_layers - 1}] for self_speculative with this "
                             f"{num_layers}-layer model (got {exit_layer})")
        if drafts < 1:
            raise UsageError(f"{drafts_source} must be >= 1 (got {drafts})")
        completed = dataclasses.replace(config, exit_layer=exit_layer, num_speculations=drafts)
        self.policy = self.policy or POLICIES[completed.draft_policy](completed)
        return completed

    def own(self, config):
        return dataclasses.replace(config, generation_strategy=self.name)

    def passes(self, config, num_layers):
        """Drafting one token at a time, verifying a draft of each length the policy may choose (a shorter one, at
        the end of the budget, runs uncompiled), and a step without drafts, a full pass (each compiled only if
        one runs)"""
        shadow = {0} if self.policy.shadows else set()  # a step without drafts that looks at the exit's choice
        return ({(0, config.exit_layer, 1), (0, num_layers, 1)}
                | {(config.exit_layer, num_layers, k + 1) for k in self.policy.lengths() if k > 0 or k in shadow})

    def timed_passes(self, config):
        return config.exit_layer, draft_share(self.policy.longest, config.max_steps) + 1

    def cache_room(self, config, budget):
        return min(self.policy.longest, budget) + 1  # one step's drafts, never more than the budget

    def output_layer(self, config, num_layers):
        return num_layers

    def step_seconds(self, costs, drafts):
        return drafting.step_seconds(costs, drafts)  # a step without drafts is a full pass

    def begin(self, generator, rows, context):
        self.trail = []
        return self.policy.begin(generator, rows, context)

    def step(self, d, budgets):
        """Every row drafts with layers [0, E) as many tokens as the largest share (a row's share: up to the
        draft length the policy chose for this step, never past its budget); one pass of layers [E, L) verifies
        every row's drafts over
        their cached exit-layer hidden states; each row keeps its own agreeing prefix. Drafting, verification and
        acceptance stay on the device; the step reads it once, at its end. A row's drafts past its share or after
        a stop token (drafted alongside others) are not counted, and the caller drops its tokens past its budget
        or a stop token: it gets what it gets alone."""
        length, shadow = self.policy.drafts(d.plans), self.policy.shadow(d.plans)
        self.trail.append((length, shadow))
        if length == 0 and not shadow:
            results = one_token(d, d.decoder.num_layers)
            self.policy.observe(d.plans, [0] * len(results), [0] * len(results))
            return results
        decoder, exit_layer, contexts = d.decoder, d.config.exit_layer, d.contexts()
        shares = [draft_share(length, budget) for budget in budgets]
        drafts, exit_hiddens = d.no_drafts(), []
        noise = d.noise(1, max(shares) + 1)  # (B, D + 1, V): the drafts' positions and the one after them
        for i in range(max(shares)):
            out = decoder.early_exit(d.current, d.cache, exit_layer, compiled=d.compiled, offset=i)
            exit_hiddens.append(out.hidden)
            scores = d.scores(out.logits[:, -1], contexts, drafts)
            d.current = d.choose(scores, None if noise is None else noise[:, i])[:, None]
            drafts = torch.cat([drafts, d.current], dim=1)
            if d.on_draft is not None:
                d.on_draft(int(d.current[0, 0]))
        # The last draft (or, with no drafts, the newest token) has not been through layers [0, E) yet.
        exit_hiddens.append(decoder.exit_hidden(d.current, d.cache, exit_layer, d.compiled, drafts.shape[1]))
        logits = decoder.remainder(torch.cat(exit_hiddens, dim=1), d.cache, exit_layer, d.compiled)  # (B, D+1, V)
        accepted, final = self.verify(d, contexts, drafts, logits, noise)
        d.current = final[:, None]
        D, results = drafts.shape[1], []
        read_out = [drafts, d.current, accepted[:, None]]
        shadowed = shadow and D == 0
        if shadowed:  # without drafts, whether one would have been accepted: the exit's choice from the hidden
            # state the full pass went through, against the full model's (the head once more, no pass)
            exit_scores = d.scores(decoder.head(exit_hiddens[0])[:, -1], contexts, drafts)
            read_out.append((d.choose(exit_scores, None if noise is None else noise[:, 0]) == final).long()[:, None])
        rows = read(torch.cat(read_out, dim=1))
        for b, row in enumerate(rows):
            n = row[D + 1]
            own = self._own_drafts(row[:D], shares[b], d.stop_ids)
            results.append(StepResult(row[:n] + [row[D]], drafted=own, accepted=min(n, own)))
        self.policy.observe(d.plans, [r.drafted for r in results], [r.accepted for r in results],
                            [int(row[-1]) for row in rows] if shadowed else None)
        # every row keeps its accepted drafts and the token before them; the device's counts where rows differ
        kept = [len(r.tokens) for r in results]
        d.commit(kept, accepted + 1 if len(set(kept)) > 1 else None)
        return results

    def metrics(self, mine, plain, batches, costs):
        """Beside the overhead: the ideal speedup for the measured acceptance and the pass costs timed beside the
        run, the measured speedup over our autoregressive decoding (same layer code, so the ratio is the
        speculation's own gain) in tokens/s and after the first token (the prompt's pass apart, as the ideal
        counts), the efficiency (the latter over the ideal), the KV cache against autoregressive decoding's, and
        the draft length chosen per batch size."""
        report = super().metrics(mine, plain, batches, costs)
        samples = [s for rows in batches for s in rows]
        report |= self.policy.metrics()
        if costs is not None:
            step_drafts = sum((Counter(s.step_drafts) for s in samples), Counter())  # every row's steps, each
            # priced alone at the batch's pass costs
            report |= {"ideal_speedup_vs_autoregressive": self.ideal_speedup(
                costs, step_drafts, tokens=sum(s.steps + s.accepted for s in samples)),
                "pass_costs_seconds": dataclasses.asdict(costs)}
        if plain:
            report["speedup_vs_autoregressive"] = mine["tokens_per_second"] / plain["tokens_per_second"]
            if "ms_per_token_after_first" in report and "ms_per_token_after_first" in plain:
                # what the ideal models: the steps after the prompt's pass, which costs both strategies the same
                decode = plain["ms_per_token_after_first"] / report["ms_per_token_after_first"]
                report["decode_speedup_vs_autoregressive"] = decode
                report["efficiency"] = decode / report["ideal_speedup_vs_autoregressive"]
            for key, name in (("kv_cache_bytes_max", "kv_cache"), ("peak_gpu_bytes_max", "peak_gpu_memory")):
                if mine[key] and plain[key]:
                    report[f"{name}_vs_autoregressive"] = mine[key] / plain[key]
        return report

    def report_lines(self, name, m):
        """The speculation's own gain against its ideal, its memory, its draft lengths, its overhead."""
        lines = []
        if "ideal_speedup_vs_autoregressive" in m:
            lines.append(f"{name}: ideal speedup over autoregressive {m['ideal_speedup_vs_autoregressive']:.2f}x "
                         "(acceptance and pass costs measured here; model in docs/performance.md)")
            if "efficiency" in m:
                lines[-1] += (f", measured {m['speedup_vs_autoregressive']:.2f}x (after the first token "
                              f"{m['decode_speedup_vs_autoregressive']:.2f}x), efficiency {100 * m['efficiency']:.0f}%")
        if "kv_cache_vs_autoregressive" in m:
            lines.append(f"{name}: KV cache {m['kv_cache_bytes_max'] / 2**20:.2f} MiB, "
                         f"{m['kv_cache_vs_autoregressive']:.2f}x autoregressive's")
        if "peak_gpu_memory_vs_autoregressive" in m:
            lines.append(f"{name}: peak GPU memory {m['peak_gpu_memory_vs_autoregressive']:.2f}x autoregressive's")
        if "draft_length_by_batch_size" in m:
            chosen = ", ".join(f"{k} at batch {b}" for b, k in m["draft_length_by_batch_size"].items())
            lines.append(f"{name}: drafts per step chosen from the cost model: {chosen} (0: autoregressive)")
        if m.get("drafts_per_step_histogram"):  # a policy that varies its length from step to step
            steps = m["drafts_per_step_histogram"]
            line = (f"{name}: {m['draft_policy']} drafting: {m['mean_drafts_per_step']:.2f} drafts per step, none in "
                    f"{100 * steps.get(0, 0) / sum(steps.values()):.0f}% of steps, at most {max(steps)}")
            lines.append(line + (f"; break-even rate of first drafts {m['break_even']:.2f}" if m["break_even"] else ""))
        return lines + super().report_lines(name, m)

    @staticmethod
    def _own_drafts(drafts: list[int], share: int, stop_ids: frozenset[int]) -> int:
        """How many of a row's drafts it would have drafted alone: its share, ending after a stop token."""
        own = min(len(drafts), share)
        return next((i + 1 for i, token in enumerate(drafts[:own]) if token in stop_ids), own)

    @staticmethod
    def verify(d: Decoding, contexts, drafts: torch.Tensor, logits: torch.Tensor,
               noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """How many of each row's drafts (B, D) the full model accepts, and the token it puts after them (both
        (B,), on the device), from the verifier's logits (B, D + 1, V): the full model chooses at every position
        (greedy: its argmax; sampling: its race with the position's `noise` (B, D + 1, V), the one each draft was
        drawn with), and a row keeps its drafts up to the first the full model did not choose, then the full
        model's token there. What is kept is what autoregressive decoding chooses, so sampling is lossless: each
        token is the full model's draw with its position's noise."""
        D = drafts.shape[1]
        targets = d.choose(d.scores_after(logits, contexts, drafts), noise)  # (B, D + 1)
        accepted = first_rejection(drafts == targets[:, :D])
        return accepted, targets.gather(1, accepted[:, None])[:, 0]


STRATEGY_FLAGS = ("exit_layer", "num_speculations", "batch_drafts", "draft_policy")  # flags that some strategies do not read

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
