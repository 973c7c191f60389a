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


def test_sampling_values_are_free_when_greedy():
    assert GenerationConfig(sample=False, temperature=0.0, top_p=5.0).temperature == 0.0


def test_the_strategy_name_is_the_strategy_tables_to_check():
    """The config does not know the strategies (no import circle); the table refuses an unknown name."""
    from self_speculation.strategies import configured
    from models import tiny_llama

    config = GenerationConfig(generation_strategy="medusa")
    with pytest.raises(UsageError, match="--generation_strategy must be one of autoregressive, early_exit"):
        configured(config, tiny_llama(num_layers=2).config)
