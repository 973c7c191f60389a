"""Every bad input a new user was seen to give, as a table: the script, its flags, the words its one-line error must
hold and its exit status. Each case also checks that nothing was written to the output directory.

Placeholders in the flags are files made by the `files` fixture: {model} the tiny checkpoint, {out} an empty output
directory, {binary} a file that is not UTF-8, {array} a JSONL file whose first line is an array, {long} prompts of
which the second is longer than the model's context, {corpus} a small training text, {file} a plain file,
{empty} an empty directory, {no_tokenizer} a model directory without a tokenizer (see conftest.py). The checks
every case makes are in bad_input.py; tables beside this one (test_*_input.py) use them too.
"""

import pytest

import benchmark
from arguments import run
from bad_input import SCRIPTS, assert_refused, case_id
from self_speculation import loading

GREEDY = ["--sample", "False", "--max_steps", "4"]
DATASETS = ["human_eval", "custom_jsonl", "chat_format", "cnn_dm_summarization", "xsum_summarization", "cnn_dm_lm",
            "top_v2"]

CASES = [
    # a mistyped flag names itself and the closest real flag, in every script
    *[(name, ["--model", "{model}", "--exit_layr", "3"] if name not in ("train", "exits") else ["--exit_layr", "3"],
       ["unknown flag --exit_layr", "did you mean --exit_layer"]) for name in SCRIPTS if name != "train"],
    ("train", ["--output_dir", "{out}", "--max_step", "3"], ["unknown flag --max_step", "did you mean --max_steps"]),
    ("generate", ["--model", "{model}", "--prompt", "hi", "--bogus", "1"], ["unknown flag --bogus"]),
    ("generate", ["--model", "{model}", "--prompt", "hi", "stray"], ["unexpected argument stray"]),
    # dataset flags the chosen dataset does not use
    ("benchmark", ["--model", "{model}", "--dataset", "human_eval", "--n_shot", "2"],
     ["--n_shot is for cnn_dm_summarization, xsum_summarization, top_v2", "--dataset human_eval"]),
    ("correctness", ["--model", "{model}", "--dataset", "custom_jsonl", "--data_path", "{long}", "--n_shot", "1"],
     ["--n_shot", "--dataset custom_jsonl"]),
    ("benchmark", ["--model", "{model}", "--dataset", "human_eval", "--prompt_field", "text"],
     ["--prompt_field and --response_field are custom_jsonl's", "--dataset human_eval"]),
    # numbers out of range
    ("generate", ["--model", "{model}", "--prompt", "hi", "--temperature", "inf"], ["--temperature", "finite"]),
    ("generate", ["--model", "{model}", "--prompt", "hi", "--temperature", "nan"], ["--temperature"]),
    ("generate", ["--model", "{model}", "--prompt", "hi", "--seed", "99999999999999999999999"], ["--seed", "[0, "]),
    ("generate", ["--model", "{model}", "--prompt", "hi", "--seed", "-1"], ["--seed", "[0, "]),
    ("train", ["--output_dir", "{out}", "--seed", "99999999999999999999999"], ["--seed", "[0, "]),
    ("generate", ["--model", "{model}", "--prompt", "hi", "--device", "mps"], ["--device mps", "not available"]),
    ("generate", ["--model", "{model}", "--prompt", "hi", "--device", "tpu"], ["--device", "tpu"]),
    # data files that are not text, or whose lines are not objects: every dataset names the file and the line
    *[("correctness", ["--model", "{model}", "--dataset", d, "--data_path", "{binary}"] + GREEDY,
       ["binary.jsonl", "not UTF-8", "line 2"]) for d in DATASETS],
    *[("correctness", ["--model", "{model}", "--dataset", d, "--data_path", "{array}"] + GREEDY,
       ["array.jsonl", "line 1"]) for d in DATASETS],
    ("train", ["--output_dir", "{out}", "--data", "{binary}"], ["binary.jsonl", "not UTF-8", "line 2"]),
    ("train", ["--output_dir", "{out}", "--data", "{array}"], ["array.jsonl", "line 1"]),
    # a prompt too long for the model is found before the first generation, and named
    *[(name, ["--model", "{model}", "--dataset", "custom_jsonl", "--data_path", "{long}"] + GREEDY + extra,
       ["example 2", "301 tokens", "context is 256"])
      for name, extra in [("benchmark", []), ("correctness", []), ("sweep", ["--exit_layer_last", "1",
                                                                             "--num_speculations_last", "1"])]],
    # sweep: a bad flag found at the model is reported before anything is written
    ("sweep", ["--model", "{model}", "--exit_layer_last", "5", "--exit_layer_first", "9"],
     ["--exit_layer_last (5) must be >= --exit_layer_first (9)"]),
    ("sweep", ["--model", "{model}", "--exit_layer_first", "30", "--exit_layer_last", "31", "--dataset", "custom_jsonl", "--data_path", "{long}"],
     ["--exit_layer_first", "<= 5"]),
    ("sweep", ["--model", "{empty}/nowhere", "--dataset", "custom_jsonl", "--data_path", "{long}"],
     ["--model", "does not exist"]),
    ("benchmark", ["--model", "{model}", "--batch_size", "0"], ["--batch_size", ">= 1"]),
    # eval
    ("eval", ["--model", "{model}", "--tasks", "layerskip_stdlib", "--apply_chat_template", "True"],
     ["--apply_chat_template", "no chat template"]),
    ("eval", ["--model", "{model}", "--tasks", "humaneval", "--limit", "1", "--allow_code_execution", "True"],
     ["metric code_eval", "hub is unreachable"]),
    # train: output directory, the model to start from (checked before reading any data), resume
    ("train", ["--output_dir", "{file}"], ["--output_dir", "not writable"]),
    ("train", ["--output_dir", "{file}/sub"], ["--output_dir", "not writable"]),
    ("train", ["--output_dir", "{out}", "--data", "stdlib", "--init_from", "/nonexistent"],
     ["--init_from /nonexistent", "does not exist"]),
    ("train", ["--output_dir", "{out}", "--data", "stdlib", "--init_from", "{empty}"], ["--init_from", "no config.json"]),
    ("train", ["--output_dir", "{out}", "--resume", "True"], ["--resume", "no checkpoint"]),
    ("train", ["--output_dir", "{out}", "--data", "stdlib", "--init_from", "facebook/layerskip-llama3.2-1B"],
     ["--init_from facebook/layerskip-llama3.2-1B", "unreachable"]),
    ("train", ["--output_dir", "{out}", "--data", "{corpus}", "--device", "tpu"], ["--device", "tpu"]),
    ("train", ["--output_dir", "{out}", "--data", "hf:wikitext:wikitext-2-raw-v1"], ["--data hf:wikitext", "unreachable"]),
    # model directories
    ("generate", ["--model", "{no_tokenizer}", "--prompt", "hi"], ["--model", "no tokenizer"]),
    # a checkpoint whose config disagrees with its weights, or whose weights are broken, is refused as it loads
    ("generate", ["--model", "{more_layers}", "--prompt", "hi"],
     ["do not match its config.json", "18 missing", "model.layers.6.", "8 layers"]),
    ("benchmark", ["--model", "{fewer_layers}"], ["do not match its config.json", "18 unexpected", "4 layers"]),
    ("correctness", ["--model", "{wider}"], ["shapes of its weights do not match its config.json"]),
    ("generate", ["--model", "{nan_weights}", "--prompt", "hi"], ["not finite", "model.layers.2.mlp.up_proj"]),
    ("generate", ["--model", "{torn}", "--prompt", "hi"], ["cannot load it", "SafetensorError"]),
    ("generate", ["--model", "{broken_code}", "--prompt", "hi", "--trust_remote_code", "True"],
     ["cannot load it", "AttributeError"]),
    ("exits", ["--models", "{more_layers}", "--num_samples", "1"], ["--models", "do not match its config.json"]),
    # text that is not valid Unicode: bytes that are not UTF-8 on the command line, JSON's lone surrogates
    ("generate", ["--model", "{model}", "--prompt", "abc\udcff\udcfe"], ["--prompt", "not valid UTF-8", "byte 0xff"]),
    ("generate", ["--model", "{model}", "--prompt", "hi", "--stop_words", "\ud800"], ["--stop_words", "U+D800"]),
    ("correctness", ["--model", "{model}", "--dataset", "custom_jsonl", "--data_path", "{surrogate}"] + GREEDY,
     ["surrogate.jsonl line 2", "lone surrogate U+D800"]),
    ("benchmark", ["--model", "{model}", "--template", "Q: {{message}}\udcff"], ["--template", "byte 0xff"]),
    # chat_format messages: a role that is not text, content that is not text, an empty conversation
    *[("benchmark", ["--model", "{model}", "--dataset", "chat_format", "--data_path", "{" + name + "}"] + GREEDY,
       [f"{name}.jsonl line 1"] + fragments)
      for name, fragments in [("chat_role", ["role must be a non-empty string (got 3)"]),
                              ("chat_null", ["user message's content must be text (got null)"]),
                              ("chat_image", ["parts that are not text (image_url)"]),
                              ("chat_empty", ["the conversation is empty"]),
                              ("chat_answer_only", ["no message before the assistant's answer"])]],
    # sizes that fill memory or run forever, and numbers a mode would ignore
    ("sweep", ["--model", "{model}", "--num_speculations_last", "1000000000"],
     ["--num_speculations_last 1000000000", "more than the 10000 points"]),
    ("sweep", ["--model", "{model}", "--warmup", "-1"], ["--warmup must be an integer in [0, 100]"]),
    ("benchmark", ["--model", "{model}", "--warmup", "99999999999999999999"], ["--warmup", "[0, 100]"]),
    ("correctness", ["--model", "{model}", "--tie_tolerance", "inf"], ["--tie_tolerance", "finite"]),
    *[("generate", ["--model", "{model}", "--prompt", "hi", "--sample", "False", flag, value], [flag])
      for flag, value in [("--top_p", "7"), ("--top_k", "-4"), ("--temperature", "-1")]],
    ("generate", ["--model", "{model}", "--prompt", "hi", "--stop_token_ids", "5000"],
     ["--stop_token_ids 5000", "outside the model's vocabulary of 258"]),
    ("generate", ["--model", "{model}", "--prompt", "hi", "--stop_words", ""], ["--stop_words", "empty stop word"]),
    ("generate", ["--model", "{model}", "--prompt", "hi", "--device_map", "banana"], ["--device_map", "'banana'"]),
    ("exits", ["--models", "{model}", "--max_speculations", "1000"], ["--max_speculations", "[1, 64]"]),
    ("exits", ["--models", "{model}", "--num_speculations", "9"], ["--num_speculations", "[1, 8]"]),
    # exits.py names its own flags
    ("exits", ["--models", "{empty}/nowhere"], ["--models", "does not exist"]),
    ("exits", ["--models", "{model}", "--exit_layers", "9", "--num_samples", "1"], ["--exit_layers", "[1, 5]"]),
]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input_gets_one_line(case, files, capsys, monkeypatch):
    assert_refused(*case, files, capsys, monkeypatch)


def test_keys_transformers_ignores_by_design_do_not_refuse_a_checkpoint(broken_checkpoints):
    """Old Llama 2 conversions hold rotary inv_freq buffers; the tiny checkpoint's head is tied (no lm_head key)."""
    model, _ = loading.load(broken_checkpoints["inv_freq"])
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 6


def test_a_huge_draft_length_allocates_for_the_budget_only(checkpoint, files, capsys):
    from self_speculation import GenerationConfig, Generator

    model, tokenizer = loading.load(str(checkpoint))
    cache_bytes = {}
    for drafts in (4, 100_000_000):
        config = GenerationConfig(generation_strategy="self_speculative", exit_layer=3, num_speculations=drafts,
                                  max_steps=8, sample=False)
        cache_bytes[drafts] = Generator(model, tokenizer, config).generate("def f(x):").cache_bytes
    assert cache_bytes[100_000_000] < 2 * cache_bytes[4]
    code = run(benchmark.main, ["--model", files["model"], "--dataset", "custom_jsonl", "--data_path", files["long"],
                                "--num_samples", "1", "--output_dir", files["out"],
                                "--generation_strategy", "autoregressive,self_speculative", "--exit_layer", "3",
                                "--num_speculations", "100000000", "--max_steps", "8", "--sample", "False"])
    assert code == 0, capsys.readouterr().err
