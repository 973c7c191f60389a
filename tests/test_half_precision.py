"""Half precision: greedy self-speculative output may differ from autoregressive output only by rounding near ties,
and a verifier that is really wrong is still called a divergence."""

import copy
import csv
import dataclasses
import json

import pytest
import torch

import benchmark
import correctness
import sweep
from arguments import run
from self_speculation import GenerationConfig, Generator, layers, strategies
from self_speculation.equivalence import compare, tie_tolerance, verifier_logits

PROMPTS = [[0, 5, 17, 33, 2, 9], [0, 71, 71, 4], [0] + list(range(40, 70))]
GREEDY = GenerationConfig(sample=False, max_steps=48)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def speculative(exit_layer: int, num_speculations: int) -> GenerationConfig:
    return dataclasses.replace(GREEDY, generation_strategy="self_speculative", exit_layer=exit_layer,
                               num_speculations=num_speculations)


def statuses(model, settings) -> dict[str, int]:
    """Every prompt at every (exit layer, draft length), judged against autoregressive decoding."""
    counts = {"match": 0, "near_tie": 0, "divergence": 0}
    for prompt in PROMPTS:
        reference = Generator(model, None, GREEDY).generate_ids(prompt).tokens
        for exit_layer, num_speculations in settings:
            generator = Generator(model, None, speculative(exit_layer, num_speculations))
            tokens = generator.generate_ids(prompt).tokens
            verifier = verifier_logits(generator, prompt) if tokens != reference else None
            counts[compare(model, prompt, reference, tokens, verifier).status] += 1
    return counts


GRID = [(e, d) for e in range(1, 6) for d in (1, 3, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied"])
def test_half_precision_gives_only_near_ties(request, name, dtype):
    model = copy.deepcopy(request.getfixturevalue(name)).to(DTYPES[dtype])
    counts = statuses(model, GRID)
    print(name, dtype, counts)
    assert counts["divergence"] == 0
    if (name, dtype) == ("mha_untied", "bf16"):
        assert counts["near_tie"] > 0  # the classification is exercised, not only exact equality


def test_float32_gives_matches_only(gqa_tied):
    assert statuses(gqa_tied, GRID[::4]) == {"match": len(PROMPTS) * len(GRID[::4]), "near_tie": 0, "divergence": 0}


def shift_verification_by_one(monkeypatch):
    """Verify every draft against the logits of the position before it."""
    real = strategies.SelfSpeculative.verify
    monkeypatch.setattr(strategies.SelfSpeculative, "verify", staticmethod(
        lambda d, contexts, drafts, logits, noise: real(d, contexts, drafts,
                                                        torch.cat([logits[:, :1], logits[:, :-1]], dim=1), noise)))


def verify_from_the_wrong_layer(monkeypatch):
    """Run the verification from one layer after the exit, skipping a layer."""
    real = layers.Decoder.remainder
    monkeypatch.setattr(layers.Decoder, "remainder", lambda decoder, hidden, cache, exit_layer, compiled=None:
                        real(decoder, hidden, cache, exit_layer + 1, compiled))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("breakage", [shift_verification_by_one, verify_from_the_wrong_layer])
def test_a_broken_verifier_is_a_divergence(gqa_tied, monkeypatch, breakage, dtype):
    model = copy.deepcopy(gqa_tied).to(DTYPES[dtype])
    breakage(monkeypatch)
    counts = statuses(model, [(2, 3), (4, 4)])
    assert counts["match"] == 0 and counts["divergence"] > counts["near_tie"]


def test_tolerance_follows_the_dtype_and_the_logits():
    assert tie_tolerance(torch.bfloat16, 20.0, -3.0) == 8 * 2**-7 * 20
    assert tie_tolerance(torch.float16, 0.5, 0.1) == 8 * 2**-10  # magnitudes below 1 count as 1
    assert tie_tolerance(torch.float32, 20.0, 19.0, scale=2) == 2 * 2**-23 * 20


def run_correctness(checkpoint, tmp_path, capsys, *extra):
    tmp_path.mkdir(exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def add(a, b):", "import os\n", "x = [",
                                                                           "class Stack:", "for i in range(10):"]))
    code = run(correctness.main, ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", str(prompts),
                                  "--output_dir", str(tmp_path / "out"), "--max_steps", "32", *map(str, extra)])
    [result] = (tmp_path / "out").glob("correctness_*.json")
    return code, json.loads(result.read_text()), capsys.readouterr().out


@pytest.mark.parametrize("exit_layer", [1, 3, 5])
def test_correctness_script_in_bfloat16(checkpoint, tmp_path, capsys, exit_layer):
    code, result, out = run_correctness(checkpoint, tmp_path, capsys, "--dtype", "bfloat16", "--exit_layer", exit_layer,
                                        "--num_speculations", 4)
    assert code == 0 and result["num_divergences"] == 0 and result["dtype"] == "bfloat16"
    assert result["num_matches"] + result["num_near_ties"] == result["num_prompts"] == 5
    assert f"{result['num_mismatches']} of 5 outputs differ: {result['num_near_ties']} near ties" in out


def test_correctness_script_fails_on_a_broken_verifier_in_bfloat16(checkpoint, tmp_path, capsys, monkeypatch):
    shift_verification_by_one(monkeypatch)
    # static: every step drafts, so every prompt meets the broken verifier (the adaptive policy stops drafting
    # where drafts are rejected, and a step without drafts verifies nothing)
    code, result, out = run_correctness(checkpoint, tmp_path, capsys, "--dtype", "bfloat16", "--exit_layer", 3,
                                        "--num_speculations", 4, "--draft_policy", "static")
    assert code == 1 and result["num_divergences"] == 5 and "5 divergences" in out
    record = result["results"][0]["comparison"]
    assert record["status"] == "divergence" and abs(record["full_margin"]) > record["tolerance"]


def test_strict_fails_on_near_ties(checkpoint, tmp_path, capsys, monkeypatch):
    """A tolerance wide enough makes every mismatch a near tie: exit 0, unless --strict."""
    shift_verification_by_one(monkeypatch)
    wide = ["--exit_layer", 3, "--num_speculations", 4, "--tie_tolerance", 1e9, "--draft_policy", "static"]
    code, result, _ = run_correctness(checkpoint, tmp_path / "a", capsys, *wide)
    assert code == 0 and result["num_near_ties"] == 5
    code, result, _ = run_correctness(checkpoint, tmp_path / "b", capsys, *wide, "--strict", "True")
    assert code == 1


def test_benchmark_and_sweep_count_ties_and_divergences_apart(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n{"prompt": "import os"}\n')
    common = ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", str(prompts), "--max_steps",
              "16", "--sample", "False", "--dtype", "bfloat16"]
    code = run(benchmark.main, common + ["--exit_layer", "2", "--num_speculations", "3", "--output_dir",
                                         str(tmp_path / "b"), "--generation_strategy", "self_speculative,early_exit,hf_generate"])
    assert code == 0
    [path] = (tmp_path / "b").glob("benchmark_*.json")
    metrics = json.loads(path.read_text())["metrics"]
    for name in ("self_speculative", "early_exit"):
        m = metrics[name]
        assert m["outputs_differing_from_hf_generate"] == m["near_ties_vs_hf_generate"] + m["divergences_vs_hf_generate"]
    assert metrics["self_speculative"]["divergences_vs_hf_generate"] == 0
    assert metrics["early_exit"]["divergences_vs_hf_generate"] == 2  # lossy: two layers are not the model
    code = run(sweep.main, common + ["--exit_layer_first", "2", "--exit_layer_last", "3", "--num_speculations_first",
                                     "2", "--num_speculations_last", "2", "--output_dir", str(tmp_path / "s")])
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "s" / "sweep.csv").open()))
    assert len(rows) == 2 and all(r["divergences"] == "0" for r in rows)
    assert all(int(r["outputs_differing_from_baseline"]) == int(r["near_ties"]) for r in rows)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_generate_and_eval_run_in_half_precision(checkpoint, tmp_path, capsys, dtype):
    import eval as eval_script
    import generate

    code = run(generate.main, ["--model", str(checkpoint), "--prompt", "def f(x):", "--dtype", dtype, "--max_steps", "8",
                               "--sample", "False", "--generation_strategy", "self_speculative", "--exit_layer", "3",
                               "--num_speculations", "3"])
    assert code == 0 and "| 8 tokens |" in capsys.readouterr().out
    code = run(eval_script.main, ["--model", str(checkpoint), "--tasks", "layerskip_stdlib", "--limit", "2", "--dtype",
                                  dtype, "--generation_strategy", "self_speculative", "--exit_layer", "3",
                                  "--num_speculations", "3", "--output_dir", str(tmp_path)])
    assert code == 0
    [result] = tmp_path.glob("eval_*.json")
    assert json.loads(result.read_text())["speed"]["requests"] == 2


BATCH = PROMPTS + [[0, 3], [0, 9, 9, 9, 9, 9, 9, 9, 1], [0, 88, 7, 41, 41]]


def batch_statuses(model, config: GenerationConfig) -> dict[str, int]:
    """Each row of a batch judged against the same prompt decoded alone: a batch changes the shapes every kernel
    sees, so in half precision a row may leave its batch-of-one output at a rounding tie, never further."""
    generator = Generator(model, None, config)
    alone = [generator.generate_ids(prompt).tokens for prompt in BATCH]
    counts = {"match": 0, "near_tie": 0, "divergence": 0}
    for prompt, reference, row in zip(BATCH, alone, generator.generate_batch(BATCH)):
        counts[compare(model, prompt, reference, row.tokens).status] += 1
    return counts


@pytest.mark.parametrize("config", [GREEDY, speculative(2, 3), speculative(4, 5)], ids=["ar", "ss-2-3", "ss-4-5"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["gqa_tied", "mha_untied"])
def test_a_batch_in_half_precision_leaves_its_rows_only_at_near_ties(request, name, dtype, config):
    model = copy.deepcopy(request.getfixturevalue(name)).to(DTYPES[dtype])
    counts = batch_statuses(model, config)
    print(name, dtype, config.generation_strategy, counts)
    assert counts["divergence"] == 0
    if (name, dtype) == ("mha_untied", "bf16"):
        assert counts["near_tie"] > 0  # rows do leave their batch-of-one output: the judging is exercised


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_batch_with_rows_one_position_off_is_a_divergence(gqa_tied, monkeypatch, dtype):
    model = copy.deepcopy(gqa_tied).to(DTYPES[dtype])
    real = layers.KVCache.positions

    def one_position_off(cache, offset, T, device, ragged=False):  # a batch's rows rotated and masked one early
        positions = real(cache, offset, T, device, ragged)
        return (positions - 1).clamp_min(0) if positions.dim() == 2 else positions

    monkeypatch.setattr(layers.KVCache, "positions", one_position_off)
    counts = batch_statuses(model, speculative(2, 3))
    assert counts["divergence"] > counts["near_tie"]
