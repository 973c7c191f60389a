"""Every strategy of the table, by parametrization: its greedy output is the greedy decoding of the layer it names
as its output (for a lossless strategy, the full model's, which `model.generate` gives), and its settings are
checked against the model. A new entry in STRATEGIES is tested here without a line added."""

import copy
import dataclasses

import pytest
import torch

from self_speculation import GenerationConfig, Generator, UsageError, layers
from self_speculation.strategies import STRATEGIES, configured

PROMPTS = [[0, 5, 17, 33, 2, 9], [0] + list(range(40, 70))]
MAX_STEPS = 24
SETTINGS = [(1, 1), (2, 3), (4, 5), (5, 8)]  # (exit layer, draft length), for the strategies that use them


def strategy_config(name: str, exit_layer: int, num_speculations: int) -> GenerationConfig:
    config = GenerationConfig(sample=False, max_steps=MAX_STEPS, exit_layer=exit_layer, num_speculations=num_speculations)
    return STRATEGIES[name]().own(config)


@torch.inference_mode()
def transformers_greedy(model, prompt: list[int], output_layer: int) -> list[int]:
    """Greedy decoding of the logits that norm and head give at `output_layer`, by transformers' own forward."""
    ids = list(prompt)
    for _ in range(MAX_STEPS):
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[output_layer]
        if output_layer < layers.num_layers(model):  # the last entry already has the final norm applied
            hidden = model.model.norm(hidden)
        ids.append(int(model.lm_head(hidden)[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("exit_layer, num_speculations", SETTINGS)
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_greedy_output_is_the_greedy_decoding_of_the_output_layer(model, name, exit_layer, num_speculations):
    generator = Generator(model, None, strategy_config(name, exit_layer, num_speculations))
    output_layer = generator.strategy.output_layer(generator.config, layers.num_layers(model))
    assert generator.strategy.lossless == (output_layer == layers.num_layers(model))
    for prompt in PROMPTS:
        assert generator.generate_ids(prompt).tokens == transformers_greedy(model, prompt, output_layer)


@pytest.mark.parametrize("name", [name for name, strategy in STRATEGIES.items() if not strategy.lossless])
def test_a_lossy_strategy_is_marked_so_because_it_differs(model, name):
    full = Generator(model, None, strategy_config("autoregressive", -1, -1)).generate_ids(PROMPTS[1]).tokens
    assert Generator(model, None, strategy_config(name, 2, 3)).generate_ids(PROMPTS[1]).tokens != full


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_an_exit_layer_beyond_the_model_is_refused_naming_the_flag(gqa_tied, name):
    config = dataclasses.replace(strategy_config(name, 2, 3), exit_layer=7)
    with pytest.raises(UsageError, match=r"--exit_layer must be in \[1, [56]\]"):
        configured(config, gqa_tied.config)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resources_cover_what_a_step_uses(gqa_tied, name, monkeypatch):
    """The cache never grows during a generation, it reports what it holds (every position but the newest token's,
    in each layer the strategy runs), and --compile runs every full-length pass compiled."""
    grown, make_room = [], layers.cache.Pass._make_room

    def watched(kv, index, *states):
        grown.extend([index] if kv.keys[index] is not None else [])  # a buffer made bigger, not a new one
        make_room(kv, index, *states)

    monkeypatch.setattr(layers.cache.Pass, "_make_room", watched)
    config = dataclasses.replace(strategy_config(name, 3, 4), compile=True, draft_policy="static")  # its lengths
    generator = Generator(gqa_tied, None, config)
    result = generator.generate_ids(PROMPTS[0])
    depth = 3 if name == "early_exit" else 6
    per_position = 2 * 2 * 16 * 4  # keys and values, 2 heads of 16, float32
    assert not grown and result.cache_bytes == depth * (len(PROMPTS[0]) + MAX_STEPS - 1) * per_position
    compiled = generator.strategy.passes(generator.config, 6)
    if name == "self_speculative":  # less the full pass of a step without drafts, which one prompt never takes
        compiled -= {(0, 6, 1)}
    assert generator.compiled.shapes_run == compiled


def test_autoregressive_with_an_exit_layer_is_early_exit(gqa_tied):
    strategy, config = configured(GenerationConfig(exit_layer=3), gqa_tied.config)
    assert strategy.name == "early_exit" and config.exit_layer == 3 and config.generation_strategy == "early_exit"
    strategy, config = configured(GenerationConfig(), gqa_tied.config)
    assert strategy.name == "autoregressive" and config.exit_layer == -1


@pytest.mark.parametrize("name, recommended, expected", [
    ("self_speculative", {"exit_layer": 2, "num_speculations": 3}, (2, 3)),
    ("early_exit", {"exit_layer": 2, "num_speculations": 3}, (2, -1)),
    ("early_exit", {"exit_layer": 4}, (4, -1)),  # a draft length is not needed to exit early
])
def test_the_checkpoints_recommendation_fills_unset_flags(gqa_tied, monkeypatch, name, recommended, expected):
    monkeypatch.setattr(gqa_tied.config, "layerskip", recommended, raising=False)
    _, config = configured(STRATEGIES[name]().own(GenerationConfig()), gqa_tied.config)
    assert (config.exit_layer, config.num_speculations) == expected



@pytest.mark.parametrize("layerskip", [{"exit_layer": "10"}, [10, 3], {"exit_layer": 2, "num_speculations": 1.5},
                                       {"exit_layer": True}])
@pytest.mark.parametrize("name", ["early_exit", "self_speculative"])
def test_a_hand_edited_recommendation_of_the_wrong_type_is_refused_naming_the_file(gqa_tied, name, layerskip):
    model_config = copy.deepcopy(gqa_tied.config)
    model_config.layerskip, model_config._name_or_path = layerskip, "runs/m"
    with pytest.raises(UsageError, match=r"^runs/m/config.json: `layerskip` must be an object of integers"):
        configured(GenerationConfig(generation_strategy=name), model_config)


@pytest.mark.parametrize("name", ["early_exit", "self_speculative"])
def test_an_out_of_range_recommendation_is_blamed_on_the_file_not_the_flag(gqa_tied, name):
    model_config = copy.deepcopy(gqa_tied.config)
    model_config.layerskip, model_config._name_or_path = {"exit_layer": 9, "num_speculations": 2}, "runs/m"
    with pytest.raises(UsageError, match=r"^exit_layer 9, recommended by runs/m/config.json \(set --exit_layer\) "
                                         r"must be in \[1, [56]\]"):
        configured(GenerationConfig(generation_strategy=name), model_config)
    strategy, config = configured(GenerationConfig(generation_strategy=name, exit_layer=2), model_config)
    assert config.exit_layer == 2  # the flag wins; the recommendation is not looked at


@pytest.mark.parametrize("directory, settings", [("layerskip-llama2-7B", (8, 6)), ("layerskip-llama2-13B", (15, 12))])
def test_a_facebook_checkpoint_without_our_key_runs_with_its_published_settings(tmp_path, directory, settings):
    """Offline: a local copy in a directory named as the hub checkpoint (its config has no `layerskip` key)."""
    from models import save_tiny_checkpoint

    from self_speculation.loading import load

    save_tiny_checkpoint(tmp_path / directory, num_layers=16, eos_token_id=None)
    model, _ = load(str(tmp_path / directory))
    generator = Generator(model, None, GenerationConfig(generation_strategy="self_speculative", sample=False,
                                                        max_steps=4))
    assert (generator.config.exit_layer, generator.config.num_speculations) == settings
    assert len(generator.generate_ids([0, 5, 17]).tokens) == 4


def test_any_other_model_without_settings_is_told_how_to_choose_them(gqa_tied):
    with pytest.raises(UsageError, match=r"recommends none \(exits.py predicts .*sweep.py measures a grid\)"):
        configured(GenerationConfig(generation_strategy="self_speculative"), gqa_tied.config)
