"""Per-exit analysis: agreement of early exits with the last layer, acceptance by exit layer."""

import pytest
import torch

from models import byte_tokenizer, tiny_llama
from self_speculation import layers
from self_speculation.analysis import (exit_agreement, greedy_traces, predict, simulate, simulate_adaptive,
                                       solution_loss)
from self_speculation.drafting import Adaptive
from self_speculation.costs import PassCosts
from self_speculation.strategies import SelfSpeculative
from self_speculation.config import GenerationConfig
from self_speculation.generator import Generator


def test_exit_agreement_matches_a_direct_computation():
    model = tiny_llama(eos_token_id=None)
    sequences = [[0, 5, 17, 33, 2, 9, 41], [0, 71, 71, 4]]
    agreement = exit_agreement(model, sequences)
    assert len(agreement) == 6 and agreement[-1] == 1.0
    with torch.no_grad():
        hidden_states = [model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states for s in sequences]
        for exit_layer in (1, 3):
            same = total = 0
            for s, states in zip(sequences, hidden_states):
                early = layers.head(model, states[exit_layer]).argmax(-1)
                final = model(input_ids=torch.tensor([s])).logits.argmax(-1)
                same += (early == final).sum().item()
                total += len(s)
            assert abs(agreement[exit_layer - 1] - same / total) < 1e-6


def test_solution_loss_is_the_cross_entropy_of_the_solution_tokens_only():
    model = tiny_llama(vocab_size=258, eos_token_id=None)
    tokenizer = byte_tokenizer()
    problems = [{"prompt": "def f(x):\n", "canonical_solution": "    return x\n"}, {"prompt": "a", "canonical_solution": "bc"}]
    expected, count = 0.0, 0
    with torch.no_grad():
        for p in problems:
            prompt, solution = tokenizer(p["prompt"]).input_ids, tokenizer(p["canonical_solution"], add_special_tokens=False).input_ids
            log_probs = model(input_ids=torch.tensor([prompt + solution])).logits[0].log_softmax(-1)
            for j, token in enumerate(solution):
                expected -= log_probs[len(prompt) - 1 + j, token].item()
            count += len(solution)
    assert solution_loss(model, tokenizer, problems) == pytest.approx(expected / count, rel=1e-5)


@pytest.mark.parametrize("eos", [None, 1])
def test_replayed_steps_are_the_steps_self_speculative_decoding_takes(eos):
    """The replay along one greedy generation gives every (E, d) the steps, drafts and acceptances that running
    self-speculative decoding gives; with a stop token in the vocabulary, drafts after a wrong one may differ."""
    model = tiny_llama(vocab_size=258, eos_token_id=eos)
    tokenizer = byte_tokenizer()
    prompts = ["def f(x):", "import os", "class A:"]
    traces = greedy_traces(model, tokenizer, prompts, max_steps=40)
    assert all(t.exit_choices.shape == (5, len(t.tokens)) for t in traces)
    compared = 0
    for exit_layer in (1, 3, 5):
        for d in (1, 2, 5):
            generator = Generator(model, tokenizer, GenerationConfig(generation_strategy="self_speculative", sample=False,
                                                                     max_steps=40, exit_layer=exit_layer,
                                                                     num_speculations=d, draft_policy="static"))
            for prompt, trace in zip(prompts, traces):
                real = generator.generate(prompt)
                assert real.tokens == trace.tokens
                replay = simulate(trace, exit_layer, d)
                assert (replay.steps, replay.accepted) == (real.steps, real.accepted)
                if eos is None:
                    assert replay.drafted == real.drafted
                    assert replay.step_drafts == real.step_drafts
                compared += real.accepted > 0 and real.accepted < real.drafted
    assert compared > 5  # drafts were both accepted and rejected


def test_prediction_from_replays_and_pass_costs():
    model = tiny_llama(vocab_size=258, eos_token_id=None)
    traces = greedy_traces(model, byte_tokenizer(), ["def f(x):"], max_steps=30)
    costs = PassCosts(draft=1.0, verify={1: 3.0, 2: 3.5, 3: 4.0}, full=4.0, head={1: 0.5, 2: 0.5, 3: 0.5})
    predictions = predict(traces, {2: costs}, [1, 2])
    assert [(p.exit_layer, p.num_speculations) for p in predictions] == [(2, 1), (2, 2)]
    for p in predictions:
        replay = simulate(traces[0], 2, p.num_speculations)
        assert p.speedup == pytest.approx(SelfSpeculative().ideal_speedup(costs, replay.step_drafts, replay.tokens))
        assert p.tokens_per_second == pytest.approx(p.speedup / 4.5)
        assert p.acceptance == pytest.approx(replay.accepted / replay.drafted)



def test_pass_costs_of_every_exit_are_ratios_of_the_same_moments(monkeypatch):
    """A machine that speeds up fivefold while exits.py times its passes (seen here: 2.8 s, then 0.5 s per exit
    layer) predicts what a steady machine predicts: each exit's full pass is timed in its own rounds. With one full
    pass timed first for every exit layer, the predictions doubled (exit 23 of 24 came out at 1.76x)."""
    from self_speculation.analysis import measure_costs
    from self_speculation.costs import PassTimer

    model = tiny_llama(vocab_size=258, eos_token_id=None)
    traces = greedy_traces(model, byte_tokenizer(), ["def f(x):", "import os"], max_steps=30)
    speedups = {}
    for machine, speeding_up in (("steady", 0.0), ("speeding up", 1 / 100)):
        calls = []

        def once(timer, start, end, hidden, with_head):  # seconds proportional to layers and positions
            calls.append(None)
            pace = 1 / (1 + len(calls) * speeding_up)
            return (end - start) * hidden.shape[1] * pace, (0.1 * hidden.shape[1] * pace if with_head else 0.0)

        monkeypatch.setattr(PassTimer, "once", once)
        costs = measure_costs(model, traces, [1, 3, 5], max_speculations=2, repeats=5)
        speedups[machine] = [p.speedup for p in predict(traces, costs, [1, 2])]
    assert speedups["speeding up"] == pytest.approx(speedups["steady"], rel=0.1), speedups


def test_every_exit_layer_is_timed_in_every_round(monkeypatch):
    """exits.py times all exit layers' passes in the same rounds, so that two exits are compared at the same
    moments too: each round runs the full pass, then every exit's draft and verification passes."""
    from self_speculation.costs import PassTimer

    runs = []
    monkeypatch.setattr(PassTimer, "once", lambda timer, start, end, hidden, with_head: (
        runs.append((start, end, hidden.shape[1])), (1.0, 0.1))[1])
    model = tiny_llama(vocab_size=258, eos_token_id=None)
    timer = PassTimer(layers.Decoder(model), context=8, max_positions=2, repeats=1)
    samples = timer.samples((1, 3), 2)
    one_round = [(0, 6, 1), (0, 1, 1), (1, 6, 1), (1, 6, 2), (0, 3, 1), (3, 6, 1), (3, 6, 2)]
    assert runs == one_round * 3  # two warm-up rounds and one timed
    assert set(samples) == {("full",), ("draft", 1), ("verify", 1, 1), ("verify", 1, 2), ("draft", 3),
                            ("verify", 3, 1), ("verify", 3, 2), ("head", 1), ("head", 2)}


def test_the_adaptive_policy_replayed_takes_the_steps_it_takes_decoding():
    """The adaptive draft policy is replayed with the class decoding runs: steps, drafts and acceptances of real
    runs, for a break-even rate that switches drafting off and on (shadow drafts) and one that never does."""
    model = tiny_llama(vocab_size=258, eos_token_id=None)
    tokenizer = byte_tokenizer()
    prompts = ["def f(x):", "import os", "class A:"]
    traces = greedy_traces(model, tokenizer, prompts, max_steps=40)
    plain_steps = 0
    for exit_layer, break_even in ((1, 0.6), (3, 0.6), (5, 0.6), (3, 0.0)):
        config = GenerationConfig(generation_strategy="self_speculative", sample=False, max_steps=40,
                                  exit_layer=exit_layer, num_speculations=2, draft_policy="adaptive")
        generator = Generator(model, tokenizer, config)
        generator.strategy.policy.break_even = break_even
        replayed = Adaptive(config)
        replayed.break_even = break_even
        for prompt, trace in zip(prompts, traces):
            real = generator.generate(prompt)
            replay, _ = simulate_adaptive(trace, exit_layer, replayed)
            assert (replay.steps, replay.drafted, replay.accepted) == (real.steps, real.drafted, real.accepted)
            assert replay.step_drafts == real.step_drafts  # step by step: what the cost model prices
            plain_steps += replay.step_drafts.get(0, 0)
    assert plain_steps > 10  # drafting was switched off somewhere
