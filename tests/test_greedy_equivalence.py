"""The invariant: greedy self-speculative output == greedy autoregressive output, token for token."""

import dataclasses

import pytest
import torch

from self_speculation import GenerationConfig, Generator

PROMPTS = [[0, 5, 17, 33, 2, 9], [0, 71, 71, 4], [0] + list(range(40, 70))]
MAX_STEPS = 48
GREEDY = GenerationConfig(sample=False, max_steps=MAX_STEPS)


def generate(model, config: GenerationConfig, prompt: list[int]):
    return Generator(model, None, config).generate_ids(prompt)


def speculative(config: GenerationConfig, exit_layer: int, num_speculations: int) -> GenerationConfig:
    return dataclasses.replace(
        config, generation_strategy="self_speculative", exit_layer=exit_layer, num_speculations=num_speculations
    )


@pytest.fixture(scope="module")
def autoregressive_outputs(gqa_tied, mha_untied):
    return {
        (name, i): generate(model, GREEDY, prompt).tokens
        for name, model in (("gqa_tied", gqa_tied), ("mha_untied", mha_untied))
        for i, prompt in enumerate(PROMPTS)
    }


@pytest.mark.parametrize("prompt_index", range(len(PROMPTS)))
@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied"])
def test_autoregressive_equals_hugging_face_generate(request, name, prompt_index, autoregressive_outputs):
    model = request.getfixturevalue(name)
    prompt = torch.tensor([PROMPTS[prompt_index]])
    expected = model.generate(prompt, max_new_tokens=MAX_STEPS, min_new_tokens=MAX_STEPS, do_sample=False)
    assert autoregressive_outputs[name, prompt_index] == expected[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("num_speculations", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("exit_layer", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied"])
@pytest.mark.parametrize("policy", ["static", "adaptive"])
def test_grid(request, name, exit_layer, num_speculations, policy, autoregressive_outputs):
    model = request.getfixturevalue(name)
    config = dataclasses.replace(speculative(GREEDY, exit_layer, num_speculations), draft_policy=policy)
    for i, prompt in enumerate(PROMPTS):
        result = generate(model, config, prompt)
        assert result.tokens == autoregressive_outputs[name, i], f"prompt {i}"
        assert len(result.tokens) == MAX_STEPS and result.stop_reason == "max_steps"
        assert result.accepted <= result.drafted


def test_the_test_models_accept_some_drafts_and_reject_others(model):
    """Otherwise the grid above would not exercise partial acceptance."""
    result = generate(model, speculative(GREEDY, 4, 3), PROMPTS[0])
    assert 0.2 < result.acceptance_rate < 0.95
    result = generate(model, speculative(GREEDY, 1, 3), PROMPTS[0])
    assert result.acceptance_rate < 0.5


@pytest.mark.parametrize("max_steps", [1, 2, 3, 4, 7, 11])
@pytest.mark.parametrize("num_speculations", [3, 20])
def test_max_steps_is_never_exceeded(model, max_steps, num_speculations):
    """Budgets that end inside a verified chunk, and drafts longer than what remains (20 > max_steps)."""
    config = dataclasses.replace(GREEDY, max_steps=max_steps)
    expected = generate(model, config, PROMPTS[0]).tokens
    result = generate(model, speculative(config, 5, num_speculations), PROMPTS[0])
    assert result.tokens == expected and len(expected) == max_steps


@pytest.mark.parametrize("exit_layer", [2, 5])
def test_eos_inside_a_draft(model, exit_layer, monkeypatch):
    """Make a token of the middle of the output an end-of-sequence id; both strategies must stop right there."""
    full = generate(model, GREEDY, PROMPTS[0]).tokens
    eos = full[20]
    stop_at = full.index(eos)
    unused = next(t for t in range(model.config.vocab_size) if t not in full)
    monkeypatch.setattr(model.generation_config, "eos_token_id", [unused, eos])  # several EOS ids
    expected = generate(model, GREEDY, PROMPTS[0])
    assert expected.tokens == full[: stop_at + 1] and expected.stop_reason == "eos"
    for k in (2, 6, 12):
        result = generate(model, speculative(GREEDY, exit_layer, k), PROMPTS[0])
        assert result.tokens == expected.tokens and result.stop_reason == "eos"


def test_stop_token_ids(model):
    full = generate(model, GREEDY, PROMPTS[1]).tokens
    config = dataclasses.replace(GREEDY, stop_token_ids=[full[9]])
    expected = generate(model, config, PROMPTS[1])
    assert expected.tokens[-1] == full[9] and expected.stop_reason == "stop_token"
    assert generate(model, speculative(config, 4, 5), PROMPTS[1]).tokens == expected.tokens


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_sees_the_whole_history(model, size):
    """The processor must see the prompt and everything generated: no n-gram ending in the output occurs earlier."""
    config = dataclasses.replace(GREEDY, no_repeat_ngram_size=size)
    prompt = PROMPTS[1]
    expected = generate(model, config, prompt).tokens
    sequence = prompt + expected
    grams = [tuple(sequence[i : i + size]) for i in range(len(sequence) - size + 1)]
    for end in range(len(prompt), len(sequence)):
        start = end - size + 1
        assert grams[start] not in grams[:start], f"repeated {grams[start]} at {end}"
    for exit_layer, k in ((2, 3), (5, 6)):
        assert generate(model, speculative(config, exit_layer, k), prompt).tokens == expected


@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied"])
def test_compiled_passes_give_the_same_tokens(request, name, autoregressive_outputs):
    """--compile runs the decoding passes through torch.compile over whole fixed-size buffers with a mask; the
    tokens must not change (a few compilations: slow-ish)."""
    model = request.getfixturevalue(name)
    compiled = dataclasses.replace(GREEDY, compile=True, draft_policy="static")  # the passes of a fixed length
    generators = [Generator(model, None, compiled)] + [
        Generator(model, None, speculative(compiled, exit_layer, num_speculations))
        for exit_layer, num_speculations in ((2, 1), (4, 3))]
    for i, prompt in enumerate(PROMPTS[:2]):
        for generator in generators:
            result = generator.generate_ids(prompt)
            assert result.tokens == autoregressive_outputs[name, i], f"prompt {i}, {generator.config.exit_layer}"
    # each generator compiled its own passes, and they ran
    assert [g.compiled.shapes_run for g in generators] == [
        {(0, 6, 1)}, {(0, 2, 1), (2, 6, 2)}, {(0, 4, 1), (4, 6, 4)}]
