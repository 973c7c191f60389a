"""self_speculative chooses its draft length per batch size from the cost model, down to 0 drafts (autoregressive
decoding), so that a batch never runs slower than autoregressive decoding by the model's account."""

from types import SimpleNamespace

import pytest

from models import tiny_llama
from self_speculation import GenerationConfig, Generator, layers
from self_speculation.costs import PassCosts
from self_speculation.strategies import Acceptance, SelfSpeculative

CONFIG = GenerationConfig(generation_strategy="self_speculative", sample=False, max_steps=16, exit_layer=2,
                          num_speculations=3)
PROMPTS = [[0, 5, 17, 33, 2, 9], [0, 71, 4], [0] + list(range(40, 60))]


def generator(config=CONFIG, compiled=None):
    """What `draft_length` reads of a generator when the pass costs are known already."""
    return SimpleNamespace(config=config, compiled=compiled)


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
def seen() -> SelfSpeculative:
    """A strategy that has seen drafts accepted 3, 2 and 2 times in 4, 3 and 2 tries: 1.75, 2.25 and 2.75 tokens
    per step of 1, 2 and 3 drafts."""
    strategy = SelfSpeculative()
    for accepted in (0, 3, 1, 3):
        strategy.acceptance.add(drafted=3, accepted=accepted)
    return strategy


@pytest.mark.parametrize("draft, expected", [(0.25, 3), (1.0, 3), (2.5, 0)])
def test_the_draft_length_is_the_fastest_by_the_cost_model(seen, draft, expected):
    """Cheap drafts: all three; dear ones: none (a full pass per token, which is never slower than itself)."""
    seen.batch_costs[3] = costs(draft)
    assert seen.draft_length(generator(), rows=3, context=10) == expected
    assert seen.chosen == {3: expected}
    speed = {k: seen.acceptance.tokens_per_step(k) / seen._seconds(costs(draft), k) for k in range(4)}
    assert speed[expected] == max(speed.values()) >= speed[0]


def test_one_prompt_and_batch_drafts_off_draft_the_configured_length(seen):
    seen.batch_costs[3] = costs(2.0)
    assert seen.draft_length(generator(), rows=1, context=10) == 3
    off = GenerationConfig(**{**CONFIG.__dict__, "batch_drafts": False})
    assert seen.draft_length(generator(off), rows=3, context=10) == 3
    assert SelfSpeculative().draft_length(generator(), rows=3, context=10) == 3  # nothing seen yet


def test_compiled_chooses_between_the_compiled_lengths(seen):
    seen.batch_costs[3] = costs(1.0)  # 1 draft is fastest eagerly, but only 0 and 3 are compiled
    assert seen.draft_length(generator(compiled=object()), rows=3, context=10) == 3


def test_a_batch_without_drafts_decodes_as_autoregressive_decoding():
    """Chosen 0 drafts, a batch runs full passes: the tokens of autoregressive decoding, nothing drafted."""
    model = tiny_llama(num_layers=4, seed=3, eos_token_id=None)
    reference = Generator(model, None, GenerationConfig(sample=False, max_steps=16)).generate_batch(PROMPTS)
    generator = Generator(model, None, CONFIG)
    generator.strategy.acceptance.add(drafted=3, accepted=0)
    generator.strategy.batch_costs[len(PROMPTS)] = costs(2.0)
    results = generator.generate_batch(PROMPTS)
    assert generator.strategy.chosen == {3: 0}
    assert [r.tokens for r in results] == [r.tokens for r in reference]
    assert all(r.drafted == 0 and r.steps == len(r.tokens) - 1 for r in results)


def test_pass_costs_are_timed_at_the_batch_size_once():
    model = tiny_llama(num_layers=4, seed=3, eos_token_id=None)
    generator = Generator(model, None, CONFIG)
    generator.generate_batch(PROMPTS[:1])  # one prompt: the configured length, and acceptance seen
    assert generator.strategy.acceptance.seen and not generator.strategy.batch_costs
    generator.generate_batch(PROMPTS)
    timed = generator.strategy.batch_costs[3]
    generator.generate_batch(PROMPTS)
    assert set(generator.strategy.batch_costs) == {3} and generator.strategy.batch_costs[3] is timed
    assert 0 <= generator.strategy.chosen[3] <= 3 and isinstance(generator.decoder, layers.Decoder)
