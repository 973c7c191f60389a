"""benchmark.py: every strategy on the same prompts, one valid JSON document, per-sample JSONL."""

import json

import pytest

import benchmark
from arguments import pop_option, run

STRATEGIES = "autoregressive,early_exit,self_speculative,hf_generate,hf_assistant_early_exit"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "prompts.jsonl"
    path.write_text('{"prompt": "def f(x):", "response": "return x"}\n{"prompt": "import os\\n"}\n'
                    '{"prompt": "class A:"}\n')
    return path


def test_benchmark_runs_every_strategy_and_writes_valid_json(checkpoint, prompts_file, tmp_path, capsys):
    code = run(benchmark.main, ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path",
                                str(prompts_file), "--max_steps", "16", "--sample", "False", "--exit_layer", "3",
                                "--num_speculations", "3", "--output_dir", str(tmp_path),
                                "--generation_strategy", STRATEGIES])
    out = capsys.readouterr().out
    assert code == 0
    [result_path] = tmp_path.glob("benchmark_*.json")
    result = json.loads(result_path.read_text())
    assert list(result["metrics"]) == STRATEGIES.split(",")
    metrics = result["metrics"]
    assert metrics["hf_generate"]["speedup_vs_hf_generate"] == 1.0
    # greedy and lossless: the full-model strategies agree with Hugging Face token for token
    for name in ("autoregressive", "self_speculative", "hf_assistant_early_exit"):
        assert metrics[name]["outputs_differing_from_hf_generate"] == 0, name
    assert 0 <= metrics["self_speculative"]["acceptance_rate"] <= 1
    assert result["settings"]["hf_assistant_early_exit"]["assistant_early_exit"] == 3
    assert result["settings"]["hf_assistant_early_exit"]["num_assistant_tokens"] == 3
    assert result["settings"]["early_exit"]["exit_layer"] == 3
    assert result["settings"]["autoregressive"]["exit_layer"] == -1
    records = [json.loads(line) for line in result_path.with_suffix(".jsonl").read_text().splitlines()]
    assert len(records) == 3 * 5 and {r["prompt_id"] for r in records} == {0, 1, 2}
    assert "| self_speculative |" in out


def test_unknown_strategy(capsys):
    assert run(benchmark.main, ["--generation_strategy", "autoregressive,medusa"]) == 2
    assert "medusa" in capsys.readouterr().err


def test_pop_option():
    argv = ["--a", "1", "--generation_strategy", "x,y", "--b=2"]
    assert pop_option(argv, "--generation_strategy", "z") == "x,y" and argv == ["--a", "1", "--b=2"]
    assert pop_option(argv, "--b", "z") == "2" and argv == ["--a", "1"]
    assert pop_option(argv, "--c", "z") == "z"
