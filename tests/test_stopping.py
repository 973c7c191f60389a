"""Stop words and stop tokens through the generator, with a real (byte-level) tokenizer."""

import dataclasses

import pytest

from models import byte_tokenizer, tiny_llama
from self_speculation import GenerationConfig, Generator
from self_speculation.stopping import StopCondition

GREEDY = GenerationConfig(sample=False, max_steps=60)


@pytest.fixture(scope="module")
def byte_model():
    return tiny_llama(vocab_size=258, eos_token_id=None)


def test_stop_condition_reasons():
    letters = lambda ids: "".join(chr(ord("a") + i) for i in ids)  # 0 -> a, 1 -> b, ...
    stop = StopCondition(eos_token_ids=[9], stop_token_ids=[7], stop_words=["bc"], decode=letters)
    assert stop.token_ids == {7, 9}
    assert stop.reason([3, 9]) == "eos"
    assert stop.reason([3, 7]) == "stop_token"
    assert stop.reason([0, 1, 2]) == "stop_word"
    assert stop.reason([0, 1]) is None and stop.reason([2, 1]) is None


@pytest.mark.parametrize("strategy", [{}, {"generation_strategy": "self_speculative", "exit_layer": 3,
                                           "num_speculations": 4}])
def test_stop_word_ends_generation_identically(byte_model, strategy):
    tokenizer = byte_tokenizer()
    full = Generator(byte_model, tokenizer, GREEDY).generate("def main():")
    word = full.text[30:33]  # three characters from the middle of the output
    config = dataclasses.replace(GREEDY, stop_words=[word], **strategy)
    result = Generator(byte_model, tokenizer, config).generate("def main():")
    assert result.stop_reason == "stop_word"
    assert result.text.endswith(word) and word not in result.text[:-1]
    assert full.text.startswith(result.text)
