"""Draft policies: how many tokens each self-speculative step drafts.

A policy decides before every step, from what earlier steps' one device read brought back (how many drafts each
row made and kept), so that deciding never makes the host wait for the device. It changes how many tokens are
drafted, never which are accepted: under every policy the output is autoregressive decoding's.

- `static`: --num_speculations at every step. In a batch, with --batch_drafts, the length from 0 to
  --num_speculations that the cost model makes fastest at that batch size.
- `adaptive`: one prompt's length follows its recent acceptance. After a step that accepted every draft it drafts
  one more; after one that did not, as many as it accepted (at least one, at most `LONGEST`). While its first
  draft is accepted too rarely for drafting to pay at the pass costs measured here, it drafts none (autoregressive
  decoding), and every few steps looks at what the exit would have drafted (a shadow draft: the head applied to
  the hidden state the full pass computed at the exit layer, against the full model's token), so that it drafts
  again as soon as drafting pays. The rule was chosen by replaying
  greedy decoding exactly along the embedded model's outputs (docs/performance.md). A batch drafts as the static
  policy does: a batch's step is as long as its longest draft and verifies every row's positions, and the
  per-step rules tried for batches (the rows' median wish, the cost model's choice at every step from the rows'
  wishes or from the acceptance seen) ran at 0.93-0.97x the static policy at batch 8 on the embedded model.
"""

import dataclasses
from dataclasses import dataclass

from .config import GenerationConfig
from .costs import PassCosts, PassTimer

LONGEST = 12  # the adaptive policy's longest draft (or --num_speculations, if longer)
SMOOTHING = 0.1  # weight of a step in a row's running rate of first-draft acceptance
MOST_BREAK_EVEN = 0.9  # the break-even rate at most (see `Adaptive.begin`)
SHADOW_EVERY = 2  # without drafts, a shadow draft every this many steps (each costs the head once more)


def draft_share(num_speculations: int, budget: int) -> int:
    """Drafts a step makes with `budget` tokens left: a step yields at most drafts + 1, so drafting the last
    token of the budget would be wasted."""
    return max(0, min(num_speculations, budget - 1))


def drafting_seconds(costs: PassCosts, drafts: float) -> float:
    """The cost model of a drafting step: with k drafts it runs layers [0, E) over one position k + 1 times (k
    drafts, then the last draft's exit hidden state), layers [E, L) once over k + 1 positions, the head k times
    over one position and once over k + 1."""
    k = drafts
    return (k + 1) * costs.draft + costs.at(costs.verify, k + 1) + k * costs.head[1] + costs.at(costs.head, k + 1)


def break_even(costs: PassCosts) -> float:
    """The first-draft acceptance above which drafting one token pays for itself at these pass costs:
    `step_seconds(1) / step_seconds(0) - 1`, at most MOST_BREAK_EVEN. One draft costs less than two full passes
    (layers [0, E) twice, [E, L) over 2 positions): a ratio past that is a slow moment of the machine during the
    timing, which must not switch drafting off."""
    return min(step_seconds(costs, 1) / step_seconds(costs, 0) - 1, MOST_BREAK_EVEN)


def step_seconds(costs: PassCosts, drafts: int) -> float:
    """A step of `drafts` drafts; none is a full-model pass and the head, autoregressive decoding."""
    return drafting_seconds(costs, drafts) if drafts else costs.full + costs.head[1]


class Acceptance:
    """Per draft position, how often a step reached it (every draft before it accepted) and accepted it: the
    chance of accepting draft i given the ones before, from which the cost model predicts the tokens a step of
    k drafts yields."""

    def __init__(self):
        self.reached: list[int] = []
        self.passed: list[int] = []

    @property
    def seen(self) -> bool:
        return bool(self.reached)

    def add(self, drafted: int, accepted: int) -> None:
        """One row's step: `accepted` of its `drafted` drafts kept."""
        for i in range(drafted):
            if i == len(self.reached):
                self.reached.append(0)
                self.passed.append(0)
            if i > accepted:
                break
            self.reached[i] += 1
            self.passed[i] += i < accepted

    def tokens_per_step(self, drafts: int) -> float:
        """Expected tokens of a step drafting `drafts` tokens: the verifier's one, and each draft while every one
        before it was accepted (a position never reached counts as the last one seen)."""
        tokens, chance, rate = 1.0, 1.0, 0.0
        for i in range(drafts):
            if i < len(self.reached) and self.reached[i]:
                rate = self.passed[i] / self.reached[i]
            chance *= rate
            tokens += chance
        return tokens


class DraftPolicy:
    """What a policy provides to `strategies.SelfSpeculative`:
    - `longest`: the most tokens a step may draft (the cache's room; with --compile, a verification pass each
      length in `lengths` needs);
    - `lengths`: the draft lengths it may choose;
    - `begin(generator, rows, context)`: a generation of `rows` rows begins; before its clock starts, so that
      pass costs timed here are not charged to it. Returns the per-row state it keeps (`Decoding.plans`, which
      follows the rows as they leave);
    - `drafts(plans)`: how many tokens this step drafts (rows whose budget ends first draft fewer);
    - `shadow(plans)`: drafting none, whether the step also tells whether one draft would have been accepted;
    - `observe(plans, drafted, accepted, shadows)`: what the step's one read brought back, per row (`shadows`:
      per row 1 where the shadow draft would have been accepted, when the step made one);
    - `metrics()`: what a benchmark reports of its choices."""

    name: str
    shadows = False  # whether it asks for shadow drafts (a pass of layers [E, L) over one position, compiled)

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.steps = self.drafted = 0  # over every generation: for mean drafts per step

    @property
    def longest(self) -> int:
        return self.config.num_speculations

    def lengths(self) -> tuple[int, ...]:
        return (self.longest,)

    def begin(self, generator, rows: int, context: int) -> list:
        return [None] * rows

    def drafts(self, plans: list) -> int:
        raise NotImplementedError

    def shadow(self, plans: list) -> bool:
        return False

    def observe(self, plans: list, drafted: list[int], accepted: list[int], shadows: list[int] | None = None) -> None:
        self.steps += 1
        self.drafted += max(drafted, default=0)

    def metrics(self) -> dict:
        return {"draft_policy": self.name, "mean_drafts_per_step": self.drafted / self.steps if self.steps else None}


class Static(DraftPolicy):
    """--num_speculations at every step; in a batch, with --batch_drafts, the cost model's choice for its size."""

    name = "static"

    def __init__(self, config: GenerationConfig):
        super().__init__(config)
        self.acceptance = Acceptance()  # of every step: what a batch's length is chosen from
        self.batch_costs: dict[int, PassCosts] = {}  # rows -> pass costs timed at that batch size
        self.chosen: dict[int, int] = {}  # rows -> the draft length last chosen for that batch size
        self.length = config.num_speculations

    def lengths(self):
        return (0, self.longest) if self.config.batch_drafts else (self.longest,)

    def begin(self, generator, rows, context):
        """--num_speculations for one prompt (the recommendation is tuned there, and sweeps measure it). For a
        batch with --batch_drafts, the length from 0 to --num_speculations that the cost model makes fastest, from
        pass costs timed at this batch size (once per size) and the acceptance per draft position seen so far;
        0 drafts is a full-model pass per token, autoregressive decoding, so a batch never runs slower than it
        by the model's account. Compiled, the choice is --num_speculations or 0 (the passes compiled)."""
        config, compiled = self.config, generator.compiled
        self.length = config.num_speculations
        if rows > 1 and config.batch_drafts:
            most = draft_share(config.num_speculations, config.max_steps)  # never more than a generation drafts
            if rows not in self.batch_costs:  # at the first batch of a size, acceptance seen or not: a warm-up
                # at each batch size then leaves the timing out of every timed generation's call
                timer = PassTimer(generator.decoder, context, most + 1, compiled, rows, 5, generator.new_cache)
                self.batch_costs[rows] = timer.costs(config.exit_layer, most + 1)
            if not self.acceptance.seen:
                return super().begin(generator, rows, context)
            costs = self.batch_costs[rows]
            choices = range(most + 1) if compiled is None else (0, most)
            self.length = self.chosen[rows] = max(
                choices, key=lambda k: self.acceptance.tokens_per_step(k) / step_seconds(costs, k))
        return super().begin(generator, rows, context)

    def drafts(self, plans):
        return self.length

    def observe(self, plans, drafted, accepted, shadows=None):
        super().observe(plans, drafted, accepted)
        for own, kept in zip(drafted, accepted):
            self.acceptance.add(own, kept)

    def metrics(self):
        return super().metrics() | ({"draft_length_by_batch_size": dict(sorted(self.chosen.items()))}
                                    if self.chosen else {})


@dataclass
class RowPlan:
    """One row's state under the adaptive policy."""

    length: int  # drafts it asks for at the next step (0: none)
    rate: float = 1.0  # running rate at which its first draft is accepted
    wait: int = 0  # without drafts: steps before the next shadow draft


class Adaptive(DraftPolicy):
    """One prompt: one more draft after a step that kept every draft, as many as it kept after one that did not;
    none while the first draft is accepted too rarely to pay (`break_even`), a shadow draft every SHADOW_EVERY
    steps telling when it pays again.
    A batch: as the static policy drafts (the rules above, for a batch's rows, measured slower: see the module)."""

    name, shadows = "adaptive", True

    def __init__(self, config: GenerationConfig):
        super().__init__(config)
        self.batches = Static(config)  # what a batch drafts; it sees every step, one prompt's too
        self.break_even: float | None = None  # the first-draft acceptance above which drafting pays (one prompt)
        self.rows = 1
        self.lengths_used: dict[int, int] = {}  # draft length -> steps that drafted it

    @property
    def longest(self):
        return max(LONGEST, self.config.num_speculations)

    def lengths(self):
        """Every length up to `longest`; compiled, a few (each is a verification pass to compile)."""
        if self.config.compile:
            return tuple(sorted({0, 1, 2, 4, 8, self.longest} - set(range(self.longest + 1, 9))))
        return range(self.longest + 1)

    def begin(self, generator, rows, context):
        """One prompt: the break-even rate of one draft against none, from pass costs timed once."""
        self.rows = rows
        if rows > 1:
            return self.batches.begin(generator, rows, context)
        if self.break_even is None:
            # eager passes: compiled ones would compile passes the decoding may never run, for a ratio
            self.break_even = break_even(PassTimer(generator.decoder, context, 2, None, 1, 5).costs(
                self.config.exit_layer, 2))
        return [RowPlan(min(self.config.num_speculations, self.longest))]

    def drafts(self, plans):
        """What the prompt's plan asks for, down to a length the policy may run; a batch: the static policy's."""
        if self.rows > 1:
            return self.batches.drafts(plans)
        if not self.config.compile:
            return min(plans[0].length, self.longest)
        return max(k for k in self.lengths() if k <= plans[0].length)

    def shadow(self, plans):
        return self.rows == 1 and plans[0].length == 0 and plans[0].wait <= 0

    def observe(self, plans, drafted, accepted, shadows=None):
        super().observe(plans, drafted, accepted)
        self.batches.observe(plans, drafted, accepted)
        for own in drafted:
            self.lengths_used[own] = self.lengths_used.get(own, 0) + 1
        if self.rows > 1:
            return
        [plan], [own], [kept] = plans, drafted, accepted
        if own == 0 and shadows is None:  # no drafts, no shadow draft: count down to the next one
            plan.wait -= 1
            return
        plan.rate += SMOOTHING * ((shadows[0] if own == 0 else kept > 0) - plan.rate)
        if plan.rate < self.break_even:  # drafting does not pay: none, a shadow draft now and then
            plan.length, plan.wait = 0, SHADOW_EVERY - 1
        elif own == 0:
            plan.length = 1
        elif kept == own:
            plan.length = min(own + 1, self.longest)
        else:
            plan.length = max(kept, 1)

    def metrics(self):
        return (self.batches.metrics() | super().metrics()
                | {"drafts_per_step_histogram": dict(sorted(self.lengths_used.items())),
                   "break_even": self.break_even})


class Replayed(DraftPolicy):
    """The lengths (and shadow drafts) another policy chose in one generation (`SelfSpeculative.trail`), in order:
    a replay of that generation drafts exactly as it did, so that its passes round as they did."""

    name = "replayed"

    @property
    def shadows(self):
        return any(shadow for _, shadow in self.trail)

    def __init__(self, config: GenerationConfig, trail: list[tuple[int, bool]], longest: int):
        super().__init__(config)
        self.trail, self.most, self.at = trail, longest, 0

    @property
    def longest(self):
        return self.most

    def drafts(self, plans):
        return self.trail[self.at][0]

    def shadow(self, plans):
        return self.trail[self.at][1]

    def observe(self, plans, drafted, accepted, shadows=None):
        super().observe(plans, drafted, accepted)
        self.at += 1


POLICIES: dict[str, type[DraftPolicy]] = {"static": Static, "adaptive": Adaptive}  # config.DRAFT_POLICIES
