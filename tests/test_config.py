"""GenerationConfig is plain data: values are checked one by one, and nothing about strategies or models."""

import math

import pytest

from self_speculation import GenerationConfig, UsageError


@pytest.mark.parametrize("values, flag", [
    ({"max_steps": 0}, "--max_steps"),
    ({"exit_layer": 0}, "--exit_layer"),
    ({"num_speculations": 0}, "--num_speculations"),
    ({"temperature": math.inf}, "--temperature"),
    ({"temperature": math.nan}, "--temperature"),
    ({"top_p": 0.0}, "--top_p"),
    ({"top_k": -1}, "--top_k"),
    ({"no_repeat_ngram_size": -1}, "--no_repeat_ngram_size"),
])
def test_each_value_is_checked(values, flag):
    with pytest.raises(UsageError, match=flag):
        GenerationConfig(**values)


def test_sampling_values_are_checked_when_greedy_too():
    """A temperature of 0 means greedy decoding; a top_p of 5 or a negative top_k is a mistake in either mode."""
    assert GenerationConfig(sample=False, temperature=0.0).temperature == 0.0
    for values, flag in [({"top_p": 7.0}, "--top_p"), ({"top_k": -4}, "--top_k"), ({"temperature": -1.0}, "--temperature"),
                         ({"temperature": math.nan}, "--temperature")]:
        with pytest.raises(UsageError, match=flag):
            GenerationConfig(sample=False, **values)
    with pytest.raises(UsageError, match="--temperature must be a finite number > 0"):
        GenerationConfig(sample=True, temperature=0.0)


@pytest.mark.parametrize("values, message", [
    ({"stop_words": ["ok", ""]}, "--stop_words: an empty stop word"),
    ({"stop_token_ids": [-3]}, "--stop_token_ids must be an integer >= 0"),
])
def test_stop_conditions_are_checked(values, message):
    with pytest.raises(UsageError, match=message):
        GenerationConfig(**values)


def test_stop_token_ids_outside_the_vocabulary_are_refused():
    from self_speculation.strategies import configured
    from models import tiny_llama

    model_config = tiny_llama(num_layers=2, vocab_size=96).config
    assert configured(GenerationConfig(stop_token_ids=[95]), model_config)[1].stop_token_ids == [95]
    with pytest.raises(UsageError, match="--stop_token_ids 96, 1000: outside the model's vocabulary of 96 tokens"):
        configured(GenerationConfig(stop_token_ids=[3, 96, 1000]), model_config)


def test_the_strategy_name_is_the_strategy_tables_to_check():
    """The config does not know the strategies (no import circle); the table refuses an unknown name."""
    from self_speculation.strategies import configured
    from models import tiny_llama

    config = GenerationConfig(generation_strategy="medusa")
    with pytest.raises(UsageError, match="--generation_strategy must be one of autoregressive, early_exit"):
        configured(config, tiny_llama(num_layers=2).config)
