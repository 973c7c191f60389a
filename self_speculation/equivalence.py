"""Two greedy outputs of one prompt compared: equal, a near tie, or a divergence.

In float32 greedy self-speculative output equals greedy autoregressive output token for token. In half precision
it need not: the verifier runs several positions through layers [E, L) in one pass, which rounds differently from
one position at a time, and where the two best tokens' logits are closer than that rounding the argmax can flip.
From the first differing position on, the two outputs continue from different prefixes and owe each other nothing.

So a mismatch is judged at its first differing position i, where the reference chose token a and the candidate
token b. The full model is run on the common prefix (prompt and the i tokens both share) in one pass, and the
margin logit(a) − logit(b) is taken; where the candidate is self-speculative decoding, the same margin is taken the
other way round under the verifier's own logits, the ones that chose b. The mismatch is a **near tie** when every
margin is within the rounding error of the dtype:

    tolerance = tie_tolerance × eps(dtype) × max(|logit(a)|, |logit(b)|, 1)

eps is the dtype's machine epsilon (2^-7 for bfloat16, 2^-10 for float16, 2^-23 for float32): one rounding of a
logit of that magnitude. Logits come out of a head whose inputs went through every layer's rounding, so the margin a
flip needs is several such roundings; `TIE_TOLERANCE` is that number, measured (docs/correctness.md). Anything else is a
**divergence**: one side chose a token the full model clearly ranks lower, which rounding cannot explain.
"""

import copy
from dataclasses import asdict, dataclass

import torch

from . import layers
from .drafting import Replayed
from .generator import Generator
from .strategies import SelfSpeculative

TIE_TOLERANCE = 8.0


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where the sequences differ (the shorter one's length if one is a prefix of the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class Comparison:
    status: str  # match, near_tie or divergence
    common_prefix: int  # generated tokens both outputs share from the start
    reference_token: int | None = None  # what each side chose at the first difference
    candidate_token: int | None = None
    full_margin: float | None = None  # full model on the common prefix: logit(reference) − logit(candidate)
    verifier_margin: float | None = None  # the verifier's logits there: logit(candidate) − logit(reference)
    tolerance: float | None = None

    @property
    def largest_margin(self) -> float | None:
        margins = [abs(m) for m in (self.full_margin, self.verifier_margin) if m is not None]
        return max(margins) if margins else None

    def describe(self) -> str:
        if self.status == "match":
            return "match"
        if self.full_margin is None:
            return f"{self.status}: one output stops after token {self.common_prefix}"
        verifier = "" if self.verifier_margin is None else f", verifier margin {self.verifier_margin:.4g}"
        return (f"{self.status.replace('_', ' ')} at token {self.common_prefix}: full-model margin "
                f"{self.full_margin:.4g}{verifier} (tolerance {self.tolerance:.3g})")

    def as_dict(self) -> dict:
        return asdict(self) | {"largest_margin": self.largest_margin}


def tie_tolerance(dtype: torch.dtype, logit_a: float, logit_b: float, scale: float = TIE_TOLERANCE) -> float:
    return scale * torch.finfo(dtype).eps * max(abs(logit_a), abs(logit_b), 1.0)


@torch.inference_mode()
def next_token_logits(model, ids: list[int]) -> torch.Tensor:
    """The full model's logits (V,) after `ids`, from one pass over all of them."""
    device = model.lm_head.weight.device
    return layers.full_forward(model, torch.tensor([ids], device=device), layers.new_cache(len(ids) + 1),
                               last_only=True)[0, -1]


def compare(model, prompt_ids: list[int], reference: list[int], candidate: list[int],
            verifier: dict[int, torch.Tensor] | None = None, scale: float = TIE_TOLERANCE) -> Comparison:
    """Judge `candidate` against `reference` (generated tokens after `prompt_ids`). `verifier` maps a generated
    token's index to the logits that chose it, where the candidate is self-speculative decoding."""
    i = first_difference(reference, candidate)
    if i is None:
        return Comparison("match", len(reference))
    if i >= min(len(reference), len(candidate)):
        return Comparison("divergence", i)
    a, b = reference[i], candidate[i]
    logits = next_token_logits(model, prompt_ids + reference[:i])
    tolerance = tie_tolerance(model.lm_head.weight.dtype, logits[a].item(), logits[b].item(), scale)
    full_margin = (logits[a] - logits[b]).item()
    verifier_margin = None
    if verifier is not None and i in verifier:
        verifier_margin = (verifier[i][b] - verifier[i][a]).item()
    margins = [m for m in (full_margin, verifier_margin) if m is not None]
    status = "near_tie" if all(abs(m) <= tolerance for m in margins) else "divergence"
    return Comparison(status, i, a, b, full_margin, verifier_margin, tolerance)


def tally(model, prompts: list[list[int]], references: list[list[int]], candidates: list[list[int]],
          scale: float = TIE_TOLERANCE) -> dict[str, int]:
    """How many candidates differ from their references, and how many of those are near ties and divergences."""
    statuses = [compare(model, p, r, c, scale=scale).status for p, r, c in zip(prompts, references, candidates)]
    return {"differing": len(statuses) - statuses.count("match"), "near_ties": statuses.count("near_tie"),
            "divergences": statuses.count("divergence")}


class _RecordingVerifier(SelfSpeculative):
    """Self-speculative decoding that keeps, for every token it emits after the prompt's, the verifier's logits
    that chose it, by the token's index in the whole sequence."""

    def __init__(self, policy):
        super().__init__(policy)
        self.rows: dict[int, torch.Tensor] = {}

    def verify(self, d, contexts, drafts, logits, noise):
        accepted, final = super().verify(d, contexts, drafts, logits, noise)
        for j in range(int(accepted[0]) + 1):  # row j chose the token after sequence + drafts[:j] (one prompt)
            self.rows[len(d.sequences[0]) + j] = logits[0, j].clone()
        return accepted, final


def verifier_logits(generator: Generator, prompt_ids: list[int]) -> dict[int, torch.Tensor]:
    """Run the self-speculative `generator` on the prompt again, drafting as its last generation (this prompt's)
    did, keeping the verifier's logits: generated token index -> logits (V,) that chose it."""
    strategy = generator.strategy
    recorder = _RecordingVerifier(Replayed(generator.config, strategy.trail, strategy.policy.longest))
    replay = copy.copy(generator)  # the same configuration and compiled passes, so the same rounding
    replay.strategy = recorder
    replay.generate_ids(prompt_ids)
    return {position - len(prompt_ids): row for position, row in recorder.rows.items()}


def judge(model, tokenizer, reference: Generator, candidate: Generator, ids: list[int], prompts: list[list[int]],
          scale: float = TIE_TOLERANCE) -> list[dict]:
    """Prompts through both generators (greedy; the candidate self-speculative), together when there are several,
    and each one's verdict, as the records correctness.py writes. A lone prompt's mismatch is also judged under
    the verifier's logits (a replay of it alone); a batch's, on the full model's margin."""
    refs, cands = reference.generate_batch(prompts), candidate.generate_batch(prompts)
    records = []
    for row, (prompt, ref, cand) in enumerate(zip(prompts, refs, cands)):
        replay = len(prompts) == 1 and ref.tokens != cand.tokens
        verdict = compare(model, prompt, ref.tokens, cand.tokens, verifier_logits(candidate, prompt) if replay else None,
                          scale)
        records.append({
            "prompt_id": ids[row],
            "status": verdict.status,
            "match": verdict.status == "match",
            "first_mismatch": None if verdict.status == "match" else verdict.common_prefix,
            "verdict": f"{verdict.describe()} ({len(ref.tokens)} tokens)",
            "comparison": verdict.as_dict(),
            "acceptance_rate": cand.acceptance_rate,
            reference.strategy.name: {"tokens": ref.tokens, "text": tokenizer.decode(ref.tokens, skip_special_tokens=True)},
            candidate.strategy.name: {"tokens": cand.tokens,
                                      "text": tokenizer.decode(cand.tokens, skip_special_tokens=True)},
        })
    return records


def summary(records: list[dict]) -> dict:
    """Counts of matches, near ties and divergences over `judge`'s records, the prompts of each, the largest tie
    margin, and the line that says it."""
    ids = {s: [r["prompt_id"] for r in records if r["status"] == s] for s in ("match", "near_tie", "divergence")}
    margins = [r["comparison"]["largest_margin"] for r in records if r["status"] == "near_tie"]
    mismatches = sorted(ids["near_tie"] + ids["divergence"])
    largest = f" (largest margin {max(margins):.4g})" if margins else ""
    return {
        "num_prompts": len(records),
        "num_matches": len(ids["match"]),
        "num_near_ties": len(ids["near_tie"]),
        "num_divergences": len(ids["divergence"]),
        "num_mismatches": len(mismatches),
        "mismatched_prompt_ids": mismatches,
        "near_tie_prompt_ids": ids["near_tie"],
        "divergent_prompt_ids": ids["divergence"],
        "largest_tie_margin": max(margins, default=None),
        "verdict": f"{len(mismatches)} of {len(records)} outputs differ: {len(ids['near_tie'])} near ties{largest}, "
                   f"{len(ids['divergence'])} divergences",
    }
