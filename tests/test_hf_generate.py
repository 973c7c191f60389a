"""Hugging Face's `model.generate(..., custom_generate=...)` running this toolkit's decoding (self_speculation/hf.py
and the directory hf_custom_generate/): the same output as generate's own decoding, every setting either mapped
or refused."""

import collections
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList, TextStreamer, TopKLogitsWarper
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.stopping_criteria import MaxTimeCriteria
from transformers.generation.streamers import BaseStreamer

from models import byte_tokenizer, tiny_llama
from self_speculation import GenerationConfig, Generator, UsageError
from self_speculation.hf import Generators, layerskip_generate
from self_speculation.loading import DEFAULT_MODEL, load
from self_speculation.strategies import STRATEGIES
from test_sampling import homogeneity_p_value

ROOT = Path(__file__).resolve().parent.parent
DIRECTORY = str(ROOT / "hf_custom_generate")
PROMPTS = [[0, 5, 17, 33, 2, 9], [0, 71, 71, 4], [0] + list(range(40, 52)), [0, 3]]
TEXTS = ["def fib(n):", "import os\n", "for i in range(10):\n    ", "class Stack:\n    def push(self, x):\n"]
NEW_TOKENS = 20
SETTINGS = [  # (strategy, exit layer, draft length, draft policy); None: the checkpoint's recommendation
    ("autoregressive", None, None, None),
    ("self_speculative", 1, 1, "static"),
    ("self_speculative", 2, 4, "adaptive"),
    ("self_speculative", 4, 3, "static"),
    ("self_speculative", 5, 6, "adaptive"),
]
EMBEDDED_SETTINGS = [("autoregressive", None, None, None), ("self_speculative", None, None, None),
                     ("self_speculative", 4, 2, "static")]


def left_padded(prompts: list[list[int]], pad: int = 0) -> dict:
    """A batch as a tokenizer with padding_side="left" makes it: input_ids and attention_mask (B, T)."""
    width = max(map(len, prompts))
    return {"input_ids": torch.tensor([[pad] * (width - len(p)) + p for p in prompts]),
            "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])}


def ours(model, batch: dict, strategy="self_speculative", exit_layer=None, num_speculations=None, policy=None,
         **settings):
    options = {"exit_layer": exit_layer, "num_speculations": num_speculations, "draft_policy": policy}
    return model.generate(**batch, custom_generate=layerskip_generate, generation_strategy=strategy,
                          **{k: v for k, v in options.items() if v is not None}, **settings)


@pytest.fixture(scope="module")
def embedded():
    model, tokenizer = load(str(DEFAULT_MODEL))
    tokenizer.padding_side = "left"
    return model, tokenizer


@pytest.fixture(scope="module")
def byte_model():
    """A model over the byte tokenizer's vocabulary, EOS 1, and the tokenizer: for stop strings."""
    return tiny_llama(vocab_size=258, num_layers=4, seed=3), byte_tokenizer()


def batches(name: str, request) -> tuple:
    """The model and its batches of one and of four left-padded prompts of different lengths."""
    if name == "embedded":
        model, tokenizer = request.getfixturevalue("embedded")
        return model, [dict(tokenizer(TEXTS[:1], return_tensors="pt")),
                       dict(tokenizer(TEXTS, return_tensors="pt", padding=True))]
    return request.getfixturevalue(name), [left_padded(PROMPTS[:1]), left_padded(PROMPTS)]


@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied", "embedded"])
def test_greedy_equals_generate_at_batch_one_and_in_a_left_padded_batch(request, name):
    model, inputs = batches(name, request)
    assert inputs[1]["attention_mask"].sum(1).unique().numel() == 4  # four prompt lengths
    for batch in inputs:
        expected = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        for setting in EMBEDDED_SETTINGS if name == "embedded" else SETTINGS:
            output = ours(model, batch, *setting, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert output.tolist() == expected.tolist(), setting


def test_every_strategy_of_the_table_runs_as_the_toolkit_runs_it(gqa_tied):
    """early_exit is not the full model's output: it equals the toolkit's own Generator."""
    batch = left_padded(PROMPTS)
    for name in STRATEGIES:
        exit_layer = None if name == "autoregressive" else 3
        output = ours(gqa_tied, batch, name, exit_layer, 2 if name == "self_speculative" else None,
                      max_new_tokens=12, do_sample=False)
        config = GenerationConfig(generation_strategy=name, exit_layer=exit_layer or -1, sample=False, max_steps=12,
                                  num_speculations=2 if name == "self_speculative" else -1)
        alone = [r.tokens for r in Generator(gqa_tied, None, config).generate_batch(PROMPTS)]
        assert output[:, batch["input_ids"].shape[1]:].tolist() == alone, name


def test_return_dict_in_generate(mha_untied):
    batch = left_padded(PROMPTS)
    expected = mha_untied.generate(**batch, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    output = ours(mha_untied, batch, exit_layer=3, num_speculations=2, max_new_tokens=8, do_sample=False,
                  return_dict_in_generate=True)
    assert isinstance(output, GenerateDecoderOnlyOutput) and torch.equal(output.sequences, expected.sequences)
    assert output.scores is None and output.logits is None  # output_scores and output_logits are refused


@pytest.mark.parametrize("settings", [{"no_repeat_ngram_size": 2, "max_new_tokens": NEW_TOKENS},
                                      {"max_length": 19}], ids=["no_repeat_ngram_size", "max_length"])
def test_no_repeat_ngram_size_and_max_length(mha_untied, settings):
    """max_length counts the padded prompt, as generate counts it (13 positions in the batch: 6 new tokens)."""
    for batch in (left_padded(PROMPTS[:1]), left_padded(PROMPTS, pad=95)):
        expected = mha_untied.generate(**batch, do_sample=False, **settings)
        output = ours(mha_untied, batch, exit_layer=2, num_speculations=4, do_sample=False, **settings)
        assert output.tolist() == expected.tolist()
    if "max_length" in settings:
        assert expected.shape[1] == 19
    else:  # the rule changed the output
        assert not torch.equal(mha_untied.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS), expected)


@pytest.mark.parametrize("pad", [None, 95], ids=["pad_from_eos", "pad_token_id"])
def test_several_eos_ids_and_the_padding_of_rows_that_stop_first(gqa_tied, pad):
    batch = left_padded(PROMPTS)
    free = gqa_tied.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[:, batch["input_ids"].shape[1]:]
    eos = [free[0, 4].item(), free[2, 9].item()]  # rows 0 and 2 stop in the middle
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "eos_token_id": eos, "pad_token_id": pad}
    expected = gqa_tied.generate(**batch, **settings)
    output = ours(gqa_tied, batch, exit_layer=2, num_speculations=5, **settings)
    assert output.tolist() == expected.tolist()
    filler = eos[0] if pad is None else pad
    assert (expected[:, -3:] == filler).all(dim=1).any()  # a row was padded


def test_eos_ids_given_replace_the_models(gqa_tied):
    """generate stops at the eos_token_id given, and not at the model's own as well."""
    batch = left_padded(PROMPTS)
    free = gqa_tied.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[:, batch["input_ids"].shape[1]:]
    model = tiny_llama(gqa=True, tied=True, seed=0, eos_token_id=free[0, 2].item())  # gqa_tied, with an EOS
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "eos_token_id": [free[1, 5].item()]}
    expected = model.generate(**batch, **settings)
    assert (expected[0, batch["input_ids"].shape[1]:] == model.generation_config.eos_token_id).any()  # not a stop
    assert ours(model, batch, exit_layer=3, num_speculations=3, **settings).tolist() == expected.tolist()


def test_stop_strings_as_generate_stops(byte_model):
    model, tokenizer = byte_model
    batch = left_padded([tokenizer("x = 1").input_ids, tokenizer("def f():").input_ids])
    width = batch["input_ids"].shape[1]
    free = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[0, width:].tolist()
    pieces = [tokenizer.decode(free[i:i + 2]) for i in range(2, NEW_TOKENS - 4)]
    stop = next(p for p in pieces if len(p) == 2 and p.isascii() and p.isprintable())  # two bytes of row 0's
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "stop_strings": [stop]}
    expected = model.generate(**batch, tokenizer=tokenizer, **settings)
    assert expected.shape[1] == width + NEW_TOKENS and (expected[0, -2:] == 1).all()  # row 0 stopped, padded
    assert ours(model, batch, exit_layer=2, num_speculations=3, stop_strings_tokenizer=tokenizer,
                **settings).tolist() == expected.tolist()
    assert model.generate(**batch, custom_generate=DIRECTORY, trust_remote_code=True, tokenizer=tokenizer,
                          exit_layer=1, num_speculations=2, **settings).tolist() == expected.tolist()
    with pytest.raises(UsageError, match="stop_strings_tokenizer="):
        ours(model, batch, exit_layer=2, num_speculations=3, tokenizer=tokenizer, **settings)


REFUSED = {  # a generate argument that this route does not support -> what its error names
    "num_beams": ({"num_beams": 2}, "num_beams"),
    "repetition_penalty": ({"repetition_penalty": 1.2}, "repetition_penalty"),
    "min_new_tokens": ({"min_new_tokens": 3}, "min_new_tokens=3"),
    "num_return_sequences": ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences"),
    "output_scores": ({"output_scores": True, "return_dict_in_generate": True}, "output_scores"),
    "output_logits": ({"output_logits": True, "return_dict_in_generate": True}, "output_logits"),
    "output_hidden_states": ({"output_hidden_states": True, "return_dict_in_generate": True},
                             "output_hidden_states"),
    "typical_p": ({"typical_p": 0.5, "do_sample": True}, "typical_p"),
    "min_p": ({"min_p": 0.1, "do_sample": True}, "min_p"),
    "max_time": ({"max_time": 60.0}, "max_time"),
    "bad_words_ids": ({"bad_words_ids": [[5]]}, "bad_words_ids"),
    "suppress_tokens": ({"suppress_tokens": [5]}, "suppress_tokens"),
    "assistant_early_exit": ({"assistant_early_exit": 2}, "assistant_early_exit"),
    "logits_processor": ({"logits_processor": LogitsProcessorList([TopKLogitsWarper(3)]), "do_sample": True},
                         "TopKLogitsWarper"),
    "stopping_criteria": ({"stopping_criteria": StoppingCriteriaList([MaxTimeCriteria(60.0)])},
                          "MaxTimeCriteria"),
    "prefix_allowed_tokens_fn": ({"prefix_allowed_tokens_fn": lambda row, ids: [5, 6]},
                                 "PrefixConstrainedLogitsProcessor"),
    "inputs_embeds": ({"inputs_embeds": torch.zeros(1, 3, 64)}, "inputs_embeds"),
    "position_ids": ({"position_ids": torch.tensor([[0, 1, 2, 4, 5, 6]])}, "position_ids"),
}


@pytest.mark.parametrize("argument", list(REFUSED))
def test_an_unsupported_setting_is_refused_by_name(gqa_tied, argument):
    settings, named = REFUSED[argument]
    batch = {} if "inputs_embeds" in settings else {"input_ids": torch.tensor([PROMPTS[0]])}
    with pytest.raises(UsageError, match=named) as error:
        ours(gqa_tied, batch, exit_layer=2, num_speculations=2, max_new_tokens=4, **settings)
    assert "\n" not in str(error.value)


def test_other_refusals(gqa_tied):
    right_padded = {"input_ids": torch.tensor([[0, 5, 6], [0, 7, 0]]), "attention_mask": torch.tensor([[1, 1, 1],
                                                                                                      [1, 1, 0]])}
    refused = [
        (right_padded, {}, "row 1 is not left-padded"),
        (left_padded(PROMPTS), {"stop_strings": ["ab"], "stop_strings_tokenizer": byte_tokenizer()},
         "need a pad_token_id or an eos_token_id"),
        ({"input_ids": torch.tensor([[0] * 250])}, {"max_new_tokens": 10}, "context of 256 positions"),
        ({"input_ids": torch.tensor([PROMPTS[0]])}, {"assistant_model": gqa_tied}, "assistant_model"),
        ({"input_ids": torch.tensor([PROMPTS[0]])}, {"exit_layer": 6}, r"^exit_layer= must be in \[1, 5\]"),
        ({"input_ids": torch.tensor([PROMPTS[0]])}, {"generation_strategy": "beam"}, "^generation_strategy= must be one of"),
        ({"input_ids": torch.tensor([PROMPTS[0]])}, {"seed": -1}, "^seed= "),
    ]
    for batch, settings, message in refused:
        settings = {"exit_layer": 2, "num_speculations": 2, "max_new_tokens": 4} | settings
        with pytest.raises(UsageError, match=message):
            gqa_tied.generate(**batch, custom_generate=layerskip_generate, **settings)


class Collector(BaseStreamer):
    def __init__(self):
        self.ids, self.ends = [], 0

    def put(self, value):
        self.ids += value.flatten().tolist()

    def end(self):
        self.ends += 1


def test_the_streamer_gets_the_prompt_and_every_new_token(mha_untied, byte_model, capsys):
    batch = {"input_ids": torch.tensor([PROMPTS[0]])}
    theirs, mine, directory = Collector(), Collector(), Collector()
    expected = mha_untied.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=theirs)
    ours(mha_untied, batch, exit_layer=3, num_speculations=4, max_new_tokens=NEW_TOKENS, do_sample=False,
         streamer=mine)
    mha_untied.generate(**batch, custom_generate=DIRECTORY, trust_remote_code=True, exit_layer=2, num_speculations=3,
                        max_new_tokens=NEW_TOKENS, do_sample=False, streamer=directory)
    assert mine.ids == directory.ids == theirs.ids == expected[0].tolist()
    assert mine.ends == directory.ends == theirs.ends == 1
    model, tokenizer = byte_model
    batch = {"input_ids": torch.tensor([tokenizer("def f():").input_ids])}
    model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=TextStreamer(tokenizer))
    expected = capsys.readouterr().out
    ours(model, batch, exit_layer=2, num_speculations=3, max_new_tokens=NEW_TOKENS, do_sample=False,
         streamer=TextStreamer(tokenizer))
    assert capsys.readouterr().out == expected


def test_the_directory_route(gqa_tied):
    batch = left_padded(PROMPTS)
    expected = gqa_tied.generate(**batch, max_new_tokens=12, do_sample=False)
    output = gqa_tied.generate(**batch, custom_generate=DIRECTORY, trust_remote_code=True, max_new_tokens=12,
                               do_sample=False, exit_layer=3, num_speculations=2)
    assert output.tolist() == expected.tolist()
    with pytest.raises(ValueError, match="trust_remote_code"):
        gqa_tied.generate(**batch, custom_generate=DIRECTORY, max_new_tokens=12)


DIRECTORY_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from models import tiny_llama
model = tiny_llama(eos_token_id=None)
batch = dict(input_ids=torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9]]), attention_mask=torch.tensor([[0, 0, 1, 1], [1] * 4]))
arguments = dict(custom_generate={directory!r}, trust_remote_code=True, max_new_tokens=10, exit_layer=2,
                 num_speculations=2)
try:
    model.generate(**batch, **arguments)
except ImportError as error:
    print("refused:", error)
os.environ["LAYERSKIP_ROOT"] = {root!r}
print(model.generate(**batch, **arguments).tolist() == model.generate(**batch, max_new_tokens=10).tolist())
"""


def test_the_directory_route_finds_the_toolkit_by_layerskip_root(tmp_path):
    """transformers runs a copy of generate.py from its modules cache: outside the repository, with the toolkit
    not importable, it says how to make it so, and finds it through LAYERSKIP_ROOT."""
    script = DIRECTORY_SCRIPT.format(tests=str(ROOT / "tests"), directory=DIRECTORY, root=str(ROOT))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LAYERSKIP_ROOT")}
    env |= {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    refused, equal = run.stdout.splitlines()[-2:]
    assert "refused: the LayerSkip toolkit (package self_speculation) is not importable: set LAYERSKIP_ROOT" in refused
    assert equal == "True"


@pytest.fixture(scope="module")
def small_vocab_model():
    """Vocabulary of 8; the exit at layer 1 is far from the full model (as in test_sampling.py)."""
    return tiny_llama(vocab_size=8, num_layers=4, init_std=0.2, layer_scale=0.3, eos_token_id=None)


SAMPLES = 2000
SAMPLING = {"do_sample": True, "temperature": 0.9, "top_k": 6, "top_p": 0.95, "max_new_tokens": 4}


def continuations(output: torch.Tensor) -> collections.Counter:
    return collections.Counter(map(tuple, output[:, 3:].tolist()))


def test_sampling_draws_from_generates_distribution(small_vocab_model):
    """Continuations sampled by self-speculation through this route and by generate's own sampling, SAMPLES rows
    of one batch each: one distribution by a chi-square test, which tells a temperature of 0.9 from 1.3."""
    batch = {"input_ids": torch.tensor([[0, 3, 5]] * SAMPLES)}
    torch.manual_seed(0)
    expected = continuations(small_vocab_model.generate(**batch, **SAMPLING))
    sampled = continuations(ours(small_vocab_model, batch, exit_layer=1, num_speculations=3, seed=1, **SAMPLING))
    assert homogeneity_p_value(expected, sampled) > 1e-3
    hotter = continuations(ours(small_vocab_model, batch, exit_layer=1, num_speculations=3, seed=1,
                                **SAMPLING | {"temperature": 1.3}))
    assert homogeneity_p_value(expected, hotter) < 1e-6


def test_each_sampling_setting_reaches_the_decoding(gqa_tied):
    """Sampling narrowed to the most likely token by one setting at a time (top_k 1, a tiny top_p, a tiny
    temperature) gives generate's greedy output; left wide, it does not."""
    batch = left_padded(PROMPTS)
    greedy = gqa_tied.generate(**batch, max_new_tokens=12, do_sample=False).tolist()
    for narrow in ({"top_k": 1}, {"top_k": 0, "top_p": 1e-6}, {"top_k": 0, "temperature": 1e-3}):
        sampled = ours(gqa_tied, batch, exit_layer=2, num_speculations=3, max_new_tokens=12, do_sample=True, seed=5,
                       **narrow)
        assert sampled.tolist() == greedy, narrow
    wide = ours(gqa_tied, batch, exit_layer=2, num_speculations=3, max_new_tokens=12, do_sample=True, seed=5, top_k=0)
    assert wide.tolist() != greedy


def test_seeds(small_vocab_model):
    """seed= repeats a call; without it torch's generator gives the seed, so torch.manual_seed repeats one and
    successive calls differ."""
    batch = {"input_ids": torch.tensor([[0, 3, 5]] * 4)}
    settings = {"exit_layer": 2, "num_speculations": 3, **SAMPLING, "max_new_tokens": 12}
    seeded = [ours(small_vocab_model, batch, seed=7, **settings).tolist() for _ in range(2)]
    assert seeded[0] == seeded[1] and len({tuple(row) for row in seeded[0]}) > 1  # rows draw apart
    assert ours(small_vocab_model, batch, seed=8, **settings).tolist() != seeded[0]
    torch.manual_seed(3)
    first, second = (ours(small_vocab_model, batch, **settings).tolist() for _ in range(2))
    torch.manual_seed(3)
    assert ours(small_vocab_model, batch, **settings).tolist() == first != second


def test_a_generator_is_built_once_per_model_and_settings(gqa_tied):
    model = copy.deepcopy(gqa_tied)
    batch = left_padded(PROMPTS[:2])
    for new_tokens in (6, 9, 6):  # the budget is each call's own
        ours(model, batch, exit_layer=2, num_speculations=3, max_new_tokens=new_tokens, do_sample=False)
    [generator] = Generators.of(model).built.values()
    ours(model, batch, exit_layer=3, num_speculations=3, max_new_tokens=6, do_sample=False)
    assert len(Generators.of(model).built) == 2 and generator in Generators.of(model).built.values()
    assert not Generators.of(copy.deepcopy(model)).built  # a copy derives its own
