"""Accepted means used, or one warning line: the strategy flags each strategy declares it reads are the ones that
change what it does, and the scripts warn of a flag that nothing they run reads."""

import dataclasses
import json

import pytest

import benchmark
import eval as eval_script
import generate
from arguments import run
from self_speculation import GenerationConfig, Generator
from self_speculation.strategies import STRATEGIES

PROMPTS = [[0, 5, 17, 33, 2, 9], [0, 71, 71, 4]]
VALUES = {"exit_layer": (2, 3), "num_speculations": (1, 3),  # two settings a strategy reading the flag tells apart
          "draft_policy": ("static", "adaptive")}


@pytest.mark.parametrize("flag", list(VALUES))
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_strategy_declares_exactly_the_flags_that_change_what_it_does(gqa_tied, name, flag):
    base = GenerationConfig(sample=False, max_steps=24, exit_layer=2, num_speculations=2, batch_drafts=False)
    runs = []
    for value in VALUES[flag]:
        config = STRATEGIES[name]().own(dataclasses.replace(base, **{flag: value}))  # as a benchmark runs it
        generator = Generator(gqa_tied, None, config)
        results = generator.generate_batch(PROMPTS) + [generator.generate_ids(p) for p in PROMPTS]  # and alone
        runs.append([(r.tokens, r.drafted, r.accepted, r.steps) for r in results])
    assert (runs[0] != runs[1]) == (flag in STRATEGIES[name].flags)


def warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


def test_generate_warns_of_a_flag_its_strategy_does_not_read(checkpoint, capsys):
    common = ["--model", str(checkpoint), "--prompt", "hi", "--max_steps", "4", "--sample", "False"]
    assert run(generate.main, common + ["--num_speculations", "3", "--output_dir", "/tmp"]) == 0
    assert warnings(capsys) == [
        "warning: --output_dir ignored: generate.py prints what it generates and writes no file",
        "warning: --num_speculations ignored: autoregressive does not use it"]
    assert run(generate.main, common + ["--exit_layer", "2", "--num_speculations", "3", "--no_batch_drafts"]) == 0
    assert warnings(capsys) == [  # autoregressive with --exit_layer is early exit, which reads --exit_layer
        "warning: --num_speculations, --batch_drafts ignored: early_exit does not use them"]
    assert run(generate.main, common + ["--generation_strategy", "self_speculative", "--exit_layer", "2",
                                        "--num_speculations", "3", "--batch_drafts", "True"]) == 0
    assert warnings(capsys) == ["warning: --batch_drafts ignored: one prompt at a time (--batch_size 1)"]


def test_benchmark_warns_of_a_flag_none_of_its_strategies_reads(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n')
    common = ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", str(prompts), "--max_steps", "4",
              "--sample", "False", "--output_dir", str(tmp_path), "--exit_layer", "2", "--no_group_by_length"]
    assert run(benchmark.main, common + ["--generation_strategy", "autoregressive"]) == 0
    assert warnings(capsys) == ["warning: --exit_layer ignored: autoregressive does not use it",
                                "warning: --no_group_by_length ignored: one prompt at a time (--batch_size 1)"]
    assert run(benchmark.main, common + ["--generation_strategy", "autoregressive,hf_assistant_early_exit",
                                         "--num_speculations", "2"]) == 0
    assert warnings(capsys) == ["warning: --no_group_by_length ignored: one prompt at a time (--batch_size 1)"]


def test_eval_warns_that_a_log_likelihood_task_generates_nothing(checkpoint, tmp_path, capsys):
    argv = ["--model", str(checkpoint), "--tasks", "layerskip_stdlib_mc", "--limit", "2", "--output_dir",
            str(tmp_path), "--temperature", "0.7", "--exit_layer", "2"]
    assert run(eval_script.main, argv) == 0
    assert warnings(capsys) == ["warning: --temperature ignored: the tasks score log-likelihoods and generate nothing"]
    [document] = tmp_path.glob("eval_*.json")
    assert json.loads(document.read_text())["results"]
