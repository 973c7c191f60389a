"""Would choosing the exit layer during a generation pay? An exact replay, no timing runs beyond the pass costs:

    python scripts/exit_adaptation_replay.py                  # the embedded model, HumanEval 0-19, 128 tokens
    python scripts/exit_adaptation_replay.py --start 100 --count 20

Greedy self-speculative decoding's steps at any exit follow from one greedy generation and every exit's choice
along it (self_speculation/analysis.py). Under the adaptive draft policy this prints, from pass costs measured
here at every candidate exit (in the same rounds):
- the predicted speedup over autoregressive decoding at each fixed exit;
- an oracle that knows each prompt's best exit in advance (a bound on choosing the exit per prompt);
- an online rule: at every drafting step, "shadow tokens" (the head applied at the neighbouring candidate exits to
  the positions the step verified; layers run anyway, the heads do not) update each candidate's agreement rate,
  and every few steps the exit moves to the neighbour whose rate predicts more tokens per second, by a margin. It
  is priced with and without the shadow heads.
The result on the embedded model is in docs/performance.md (exit adaptation was not built: it did not pay).
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from self_speculation.analysis import _step, adaptive_speedup, greedy_traces, humaneval_problems, measure_costs  # noqa: E402
from self_speculation.config import GenerationConfig  # noqa: E402
from self_speculation.drafting import LONGEST, Adaptive, RowPlan, break_even, draft_share, step_seconds  # noqa: E402
from self_speculation.loading import DEFAULT_MODEL, load  # noqa: E402


def adaptive_policy(exit_layer: int, costs) -> Adaptive:
    policy = Adaptive(GenerationConfig(generation_strategy="self_speculative", sample=False, exit_layer=exit_layer,
                                       num_speculations=3, draft_policy="adaptive"))
    policy.break_even = break_even(costs)
    return policy


def rate_value(costs, rate: float) -> float:
    """Tokens per second at an exit whose drafts agree at `rate` (independently), at its best draft length."""
    rate = min(rate, 0.999)
    return max((1 - rate ** (k + 1)) / (1 - rate) / step_seconds(costs, k) for k in range(LONGEST + 1))


def online(traces, costs: dict, start: int, smoothing: float, every: int, margin: float, priced: bool) -> float:
    """The online rule's predicted speedup (see the module): exits move one candidate at a time."""
    exits = sorted(costs)
    autoregressive = statistics.median(step_seconds(c, 0) for c in costs.values())
    policies = {e: adaptive_policy(e, costs[e]) for e in exits}
    rates, exit_layer, seconds, tokens, steps = dict.fromkeys(exits, 0.7), start, 0.0, 0, 0
    for trace in traces:
        plans, done = [RowPlan(3)], 1
        while done < len(trace.tokens):
            policy, cost = policies[exit_layer], costs[exit_layer]
            choices = trace.exit_choices[exit_layer - 1].tolist()
            limit, shadow = draft_share(policy.drafts(plans), trace.budget - done), policy.shadow(plans)
            own, run = _step(trace, choices, done, limit)
            shadowed = shadow and own == 0
            policy.observe(plans, [own], [run], [int(choices[done] == trace.tokens[done])] if shadowed else None)
            seconds += step_seconds(cost, own) + shadowed * cost.head[1]
            at = exits.index(exit_layer)
            candidates = [exits[i] for i in (at - 1, at, at + 1) if 0 <= i < len(exits)]
            if own:  # the verified positions: the accepted drafts and the full model's token after them
                for candidate in candidates:
                    for position in range(done, min(done + run + 1, len(trace.tokens))):
                        agrees = trace.exit_choices[candidate - 1][position] == trace.tokens[position]
                        rates[candidate] += smoothing * (float(agrees) - rates[candidate])
                seconds += priced * (len(candidates) - 1) * cost.at(cost.head, own + 1)
                steps += 1
                if steps % every == 0:
                    best = max(candidates, key=lambda e: rate_value(costs[e], rates[e]))
                    if rate_value(costs[best], rates[best]) > (1 + margin) * rate_value(cost, rates[exit_layer]):
                        exit_layer = best
            tokens, done = tokens + run + 1, done + run + 1
    return tokens * autoregressive / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--start", type=int, default=0, help="first HumanEval problem")
    parser.add_argument("--count", type=int, default=20, help="HumanEval problems")
    parser.add_argument("--max_steps", type=int, default=128)
    parser.add_argument("--exit_layers", type=int, nargs="+", default=list(range(4, 21, 2)),
                        help="the candidate exits (neighbours in this list are what the online rule moves between)")
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    problems = humaneval_problems()[args.start : args.start + args.count]
    traces = greedy_traces(model, tokenizer, [p["prompt"] for p in problems], args.max_steps)
    costs = measure_costs(model, traces, args.exit_layers, LONGEST)
    scale = statistics.median(step_seconds(c, 0) for c in costs.values())
    for exit_layer in args.exit_layers:  # each exit's speedup on the common autoregressive scale
        own = adaptive_speedup(traces, exit_layer, costs[exit_layer], 3)
        print(f"fixed exit {exit_layer}: {own * scale / step_seconds(costs[exit_layer], 0):.3f}x")
    seconds = tokens = 0.0
    chosen = []
    for trace in (t for t in traces if len(t.tokens) > 1):  # the oracle: each prompt at its best exit, its policy
        per_exit = {}  # started afresh
        for exit_layer in args.exit_layers:
            speedup = adaptive_speedup([trace], exit_layer, costs[exit_layer], 3)
            per_exit[exit_layer] = speedup * scale / step_seconds(costs[exit_layer], 0)
        best = max(per_exit, key=per_exit.get)
        chosen.append(best)
        seconds += (len(trace.tokens) - 1) / per_exit[best]
        tokens += len(trace.tokens) - 1
    print(f"oracle, each prompt at its best exit: {tokens / seconds:.3f}x (exits {chosen})")
    start = max(args.exit_layers, key=lambda e: adaptive_speedup(traces, e, costs[e], 3) / step_seconds(costs[e], 0))
    for smoothing in (0.02, 0.05, 0.1):
        for every in (4, 16):
            for margin in (0.0, 0.05):
                priced, free = (online(traces, costs, start, smoothing, every, margin, p) for p in (True, False))
                print(f"online from exit {start}, smoothing {smoothing}, every {every} steps, margin {margin}: "
                      f"{priced:.3f}x ({free:.3f}x without the shadow heads' cost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
