"""Draft policies. The static one drafts --num_speculations, and in a batch the length the cost model makes
fastest for its size, down to 0 drafts (autoregressive decoding), so that a batch never runs slower than
autoregressive decoding by the model's account. The adaptive one follows each row's acceptance, and stops drafting
where drafting does not pay. Whatever they choose, the tokens are autoregressive decoding's."""

import dataclasses
from types import SimpleNamespace

import pytest

from models import tiny_llama
from self_speculation import GenerationConfig, Generator, layers
from self_speculation.costs import PassCosts
from self_speculation.drafting import LONGEST, Acceptance, Adaptive, RowPlan, Static, step_seconds
from self_speculation.strategies import SelfSpeculative

CONFIG = GenerationConfig(generation_strategy="self_speculative", sample=False, max_steps=16, exit_layer=2,
                          num_speculations=3, draft_policy="static")
PROMPTS = [[0, 5, 17, 33, 2, 9], [0, 71, 4], [0] + list(range(40, 60))]


def generator(config=CONFIG, compiled=None):
    """What a policy's `begin` reads of a generator when the pass costs are known already."""
    return SimpleNamespace(config=config, compiled=compiled)


def chosen(policy, rows, config=CONFIG, compiled=None) -> int:
    """The length `policy` drafts at the first step of a generation of `rows` rows."""
    return policy.drafts(policy.begin(generator(config, compiled), rows, context=10))


def costs(draft: float) -> PassCosts:
    """A full pass costs 4, the head nothing; layers [E, L) cost 3 whatever the positions, and a draft `draft`."""
    return PassCosts(draft=draft, verify={t: 3.0 for t in range(1, 5)}, full=4.0, head={t: 0.0 for t in range(1, 5)})


def test_acceptance_per_draft_position():
    acceptance = Acceptance()
    acceptance.add(drafted=3, accepted=3)
    acceptance.add(drafted=3, accepted=1)  # the second draft rejected: the third never reached
    assert acceptance.reached == [2, 2, 1] and acceptance.passed == [2, 1, 1]
    assert [acceptance.tokens_per_step(k) for k in range(4)] == [1.0, 2.0, 2.5, 3.0]
    assert acceptance.tokens_per_step(5) == 4.0  # positions never reached count as the last one seen (1.0)


@pytest.fixture
def seen() -> Static:
    """A policy that has seen drafts accepted 3, 2 and 2 times in 4, 3 and 2 tries: 1.75, 2.25 and 2.75 tokens
    per step of 1, 2 and 3 drafts."""
    policy = Static(CONFIG)
    for accepted in (0, 3, 1, 3):
        policy.acceptance.add(drafted=3, accepted=accepted)
    return policy


@pytest.mark.parametrize("draft, expected", [(0.25, 3), (1.0, 3), (2.5, 0)])
def test_the_draft_length_is_the_fastest_by_the_cost_model(seen, draft, expected):
    """Cheap drafts: all three; dear ones: none (a full pass per token, which is never slower than itself)."""
    seen.batch_costs[3] = costs(draft)
    assert chosen(seen, rows=3) == expected
    assert seen.chosen == {3: expected}
    speed = {k: seen.acceptance.tokens_per_step(k) / step_seconds(costs(draft), k) for k in range(4)}
    assert speed[expected] == max(speed.values()) >= speed[0]


def test_one_prompt_and_batch_drafts_off_draft_the_configured_length(seen):
    seen.batch_costs[3] = costs(2.0)
    assert chosen(seen, rows=1) == 3
    off = GenerationConfig(**{**CONFIG.__dict__, "batch_drafts": False})
    assert chosen(Static(off), rows=3, config=off) == 3
    fresh = Static(CONFIG)
    fresh.batch_costs[3] = costs(2.0)  # what made `seen` choose 0 above
    assert chosen(fresh, rows=3) == 3 and fresh.chosen == {}  # nothing seen yet


def test_a_batch_size_is_timed_at_its_first_batch_before_anything_is_seen():
    """The pass costs of a batch size are timed when its first batch begins, so that a warm-up at each size takes
    the timing out of later generations (Hugging Face's generate, through hf.py, times the whole call)."""
    generator = Generator(tiny_llama(num_layers=4, seed=3), None, CONFIG)
    generator.generate_batch(PROMPTS)
    policy = generator.strategy.policy
    assert set(policy.batch_costs) == {3} and policy.chosen == {}  # timed, but the configured length drafted
    generator.generate_batch(PROMPTS)
    assert set(policy.chosen) == {3}


def test_compiled_chooses_between_the_compiled_lengths(seen):
    seen.batch_costs[3] = costs(1.0)  # 1 draft is fastest eagerly, but only 0 and 3 are compiled
    assert chosen(seen, rows=3, compiled=object()) == 3


def test_a_batch_without_drafts_decodes_as_autoregressive_decoding():
    """Chosen 0 drafts, a batch runs full passes: the tokens of autoregressive decoding, nothing drafted."""
    model = tiny_llama(num_layers=4, seed=3, eos_token_id=None)
    reference = Generator(model, None, GenerationConfig(sample=False, max_steps=16)).generate_batch(PROMPTS)
    generator = Generator(model, None, CONFIG)
    generator.strategy.policy.acceptance.add(drafted=3, accepted=0)
    generator.strategy.policy.batch_costs[len(PROMPTS)] = costs(2.0)
    results = generator.generate_batch(PROMPTS)
    assert generator.strategy.policy.chosen == {3: 0}
    assert [r.tokens for r in results] == [r.tokens for r in reference]
    assert all(r.drafted == 0 and r.steps == len(r.tokens) - 1 for r in results)


def test_pass_costs_are_timed_at_the_batch_size_once():
    model = tiny_llama(num_layers=4, seed=3, eos_token_id=None)
    generator = Generator(model, None, CONFIG)
    policy = generator.strategy.policy
    generator.generate_batch(PROMPTS[:1])  # one prompt: the configured length, and acceptance seen
    assert policy.acceptance.seen and not policy.batch_costs
    generator.generate_batch(PROMPTS)
    timed = policy.batch_costs[3]
    generator.generate_batch(PROMPTS)
    assert set(policy.batch_costs) == {3} and policy.batch_costs[3] is timed
    assert 0 <= policy.chosen[3] <= 3 and isinstance(generator.decoder, layers.Decoder)


ADAPTIVE = dataclasses.replace(CONFIG, draft_policy="adaptive")


def adaptive_alone(break_even: float = 0.5) -> tuple[Adaptive, list[RowPlan]]:
    """The adaptive policy at the start of one prompt's generation, drafting pays above `break_even`."""
    policy = Adaptive(ADAPTIVE)
    policy.break_even = break_even
    return policy, policy.begin(generator(ADAPTIVE), rows=1, context=10)


def test_adaptive_drafts_one_more_after_a_full_acceptance_and_what_it_kept_after_a_rejection():
    policy, plans = adaptive_alone()
    lengths = []
    for accepted_all in (True, True, False, True, False):
        drafted = policy.drafts(plans)
        policy.observe(plans, [drafted], [drafted if accepted_all else 1])
        lengths.append(policy.drafts(plans))
    assert lengths == [4, 5, 1, 2, 1]
    for _ in range(20):  # never past its longest
        drafted = policy.drafts(plans)
        policy.observe(plans, [drafted], [drafted])
    assert policy.drafts(plans) == LONGEST


def test_adaptive_stops_drafting_where_it_does_not_pay_and_starts_again_when_its_shadow_drafts_would():
    """Without drafts, a shadow draft every SHADOW_EVERY steps says whether one would have been accepted."""
    policy, plans = adaptive_alone(break_even=0.7)
    lengths, shadows = [], []
    for step in range(60):
        drafted, shadow = policy.drafts(plans), policy.shadow(plans)
        would = int(step >= 20)  # rejected for 20 steps, then accepted
        policy.observe(plans, [drafted], [drafted * would], [would] if shadow and not drafted else None)
        lengths.append(drafted)
        shadows.append(shadow)
    first_off = lengths.index(0)
    assert lengths[:first_off] == [3, 1, 1, 1]  # the rate of first drafts accepted falls from 1 to 0.66 < 0.7
    assert [i for i, s in enumerate(shadows) if s][:3] == [first_off + 1, first_off + 3, first_off + 5]
    assert not any(s for s, k in zip(shadows, lengths) if k)  # a drafting step needs no shadow
    back = next(i for i in range(20, 60) if lengths[i])
    assert lengths[back:back + 3] == [1, 2, 3]  # the shadows' acceptance turns drafting on again


def test_adaptive_batches_draft_as_the_static_policy(seen):
    policy = Adaptive(ADAPTIVE)
    policy.batches = seen
    seen.batch_costs[3] = costs(2.5)
    assert chosen(policy, rows=3, config=ADAPTIVE) == 0 == seen.chosen[3]
    seen.batch_costs[3] = costs(0.25)
    assert chosen(policy, rows=3, config=ADAPTIVE) == 3


@pytest.mark.parametrize("sample", [False, True])
def test_adaptive_decodes_the_tokens_of_autoregressive_decoding_alone_and_in_a_ragged_batch(sample):
    """Whatever it drafts (here, on a random model, its rules switch drafting off and on), the tokens are
    autoregressive decoding's: greedy, and sampled with the same seed."""
    model = tiny_llama(num_layers=6, seed=5, eos_token_id=None)
    config = dataclasses.replace(ADAPTIVE, sample=sample, max_steps=40, temperature=0.8, top_k=20)
    reference = Generator(model, None, dataclasses.replace(config, generation_strategy="autoregressive",
                                                           exit_layer=-1)).generate_batch(PROMPTS)
    generator = Generator(model, None, config)
    alone = [generator.generate_ids(prompt) for prompt in PROMPTS]
    generator.drawn = 0  # the same noise streams again
    together = generator.generate_batch(PROMPTS)
    assert [r.tokens for r in alone] == [r.tokens for r in together] == [r.tokens for r in reference]
    used = generator.strategy.policy.metrics()["drafts_per_step_histogram"]
    assert len(used) >= 3, used  # it did change its length


def test_adaptive_compiles_a_few_lengths():
    """Each length is a verification pass to compile: compiled, the adaptive policy chooses among a few."""
    model = tiny_llama(num_layers=4, seed=3)
    strategy = SelfSpeculative()
    config = strategy.configure(dataclasses.replace(ADAPTIVE, compile=True), model.config)
    assert strategy.policy.lengths() == (0, 1, 2, 4, 8, 12) and Adaptive(ADAPTIVE).lengths() == range(13)
    assert {p for p in strategy.passes(config, 4) if p[0] == 2} == {(2, 4, k + 1) for k in (0, 1, 2, 4, 8, 12)}
