"""Batched decoding: every row of a batch gets exactly what it gets alone (greedy), for every strategy of the
table, with prompts of different lengths, rows that stop early and drafts accepted differently per row."""

import collections
import dataclasses

import pytest

from self_speculation import GenerationConfig, Generator
from self_speculation.benchmarking import batches
from self_speculation.strategies import STRATEGIES

PROMPTS = [[0, 5, 17, 33, 2, 9], [0, 71, 71, 4], [0] + list(range(40, 70)), [0, 3], [0, 9, 9, 9, 9, 9, 9, 9, 1]]


def config_for(name: str, exit_layer: int, num_speculations: int, **extra) -> GenerationConfig:
    """Greedy, with every batch drafting `num_speculations` (as a batch of one does), so that rows can be compared
    with their batches of one draft for draft (test_drafting.py covers the lengths chosen per batch size and step)."""
    config = GenerationConfig(sample=False, max_steps=32, exit_layer=exit_layer, num_speculations=num_speculations,
                              batch_drafts=False, draft_policy="static")
    return STRATEGIES[name]().own(dataclasses.replace(config, **extra))


def counts(result) -> tuple:
    """What a row must share with its batch of one: its tokens, and its drafts, accepted drafts and steps."""
    return result.tokens, result.drafted, result.accepted, result.steps


@pytest.mark.parametrize("exit_layer, num_speculations", [(1, 1), (2, 4), (4, 3), (5, 8)])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_row_equals_its_batch_of_one(model, name, exit_layer, num_speculations):
    generator = Generator(model, None, config_for(name, exit_layer, num_speculations))
    alone = [generator.generate_ids(p) for p in PROMPTS]
    batched = generator.generate_batch(PROMPTS)
    assert [counts(r) for r in batched] == [counts(r) for r in alone]
    if name == "self_speculative":  # rows accepted differently: the test covers ragged advances
        assert len({r.accepted for r in batched}) > 1


@pytest.mark.parametrize("shrink", [False, True], ids=["held", "dropped"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_rows_that_stop_early(model, name, monkeypatch, shrink):
    """An EOS in the middle of some rows' outputs, a budget that ends inside a verified chunk: stopped rows stay
    stopped while the others go on."""
    generator = Generator(model, None, config_for(name, 3, 5, max_steps=13))
    full = [generator.generate_ids(p).tokens for p in PROMPTS]
    eos = full[0][6]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [eos])
    generator = Generator(model, None, config_for(name, 3, 5, max_steps=13))
    alone = [generator.generate_ids(p) for p in PROMPTS]
    assert {r.stop_reason for r in alone} >= {"eos"}
    batched = generator.generate_batch(PROMPTS, shrink=shrink)
    assert [(counts(r), r.stop_reason) for r in batched] == [(counts(r), r.stop_reason) for r in alone]


def test_a_batch_reports_its_cache_at_its_largest(gqa_tied):
    """Every row of a batch reports the batch's cache at its largest. Held until the end, that is every row's
    prompt and tokens but its newest, and the drafts its last step accepted past a stop (at most 5 + 1 per row);
    rows that leave free theirs, so the batch never holds more."""
    generator = Generator(gqa_tied, None, config_for("self_speculative", 3, 5, max_steps=13))
    dropped, held = (generator.generate_batch(PROMPTS, shrink=shrink) for shrink in (True, False))
    assert len({r.steps for r in dropped}) > 1  # rows did leave at different steps
    per_position = 6 * 2 * 2 * 16 * 4  # 6 layers, keys and values, 2 heads of 16, float32
    kept = sum(len(p) + len(r.tokens) - 1 for p, r in zip(PROMPTS, held)) * per_position
    assert len({r.cache_bytes for r in held}) == 1 and kept <= held[0].cache_bytes < kept + 6 * len(PROMPTS) * per_position
    assert len({r.cache_bytes for r in dropped}) == 1 and dropped[0].cache_bytes <= held[0].cache_bytes


def test_compiled_passes_serve_every_batch_size(gqa_tied):
    """--compile with batches: the same tokens, and one compilation of each pass serves every batch size as rows
    leave the batch and as batches differ in size (a lone running row is kept company by a finished one)."""
    from torch._dynamo.utils import counters

    config = config_for("self_speculative", 3, 4)
    alone = [Generator(gqa_tied, None, config).generate_ids(p).tokens for p in PROMPTS]
    generator = Generator(gqa_tied, None, dataclasses.replace(config, compile=True))
    graphs = counters["stats"]["unique_graphs"]
    for rows in ([0, 1, 2, 3, 4], [2, 0, 4], [1, 3]):
        assert [r.tokens for r in generator.generate_batch([PROMPTS[i] for i in rows])] == [alone[i] for i in rows]
    assert set(generator.compiled.passes) == {(0, 3, 1, True), (3, 6, 5, True)}  # (start, end, tokens, batch)
    assert counters["stats"]["unique_graphs"] - graphs == 2


def test_speculative_sampling_in_a_batch_draws_from_the_model():
    """The chi-square test of test_sampling.py with 8 rows per batch."""
    from test_sampling import PROMPT, SAMPLING, SPECULATIVE, homogeneity_p_value
    from models import tiny_llama

    model = tiny_llama(vocab_size=8, num_layers=4, init_std=0.2, layer_scale=0.3, eos_token_id=None)
    alone = Generator(model, None, SAMPLING, seed=1)
    reference = collections.Counter(tuple(alone.generate_ids(PROMPT).tokens) for _ in range(2400))
    batched = Generator(model, None, SPECULATIVE, seed=2)
    rows = collections.Counter(tuple(r.tokens) for _ in range(300) for r in batched.generate_batch([PROMPT] * 8))
    assert homogeneity_p_value(reference, rows) > 1e-3


def test_prompts_are_batched_by_length():
    prompts = [[0] * n for n in (5, 2, 9, 2, 7)]
    grouped = batches(prompts, 2)
    assert [b.ids for b in grouped] == [[1, 3], [0, 4], [2]]
    assert all(b.prompts == [prompts[i] for i in b.ids] for b in grouped)
    assert [b.ids for b in batches(prompts, 2, by_length=False)] == [[0, 1], [2, 3], [4]]
    # one prompt at a time has no padding to save: the dataset's order (correctness.py prints as it goes)
    assert [b.ids for b in batches(prompts, 1)] == [[0], [1], [2], [3], [4]]


def test_correctness_and_sweep_in_batches(checkpoint, tmp_path):
    import csv
    import json

    import correctness
    import sweep
    from arguments import run
    from self_speculation.loading import load

    prompts = tmp_path / "prompts.jsonl"
    texts = ["for i in range(3):", "x = [1,", "import os", "class A:", "def f(x):"]  # batched [1, 3], [2, 4], [0]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
    common = ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", str(prompts), "--max_steps", "16",
              "--batch_size", "2"]
    assert run(correctness.main, common + ["--exit_layer", "3", "--num_speculations", "3", "--output_dir",
                                           str(tmp_path / "c")]) == 0
    [result] = (tmp_path / "c").glob("correctness_*.json")
    result = json.loads(result.read_text())
    assert result["num_prompts"] == 5 and result["num_matches"] == 5
    assert [r["prompt_id"] for r in result["results"]] == [0, 1, 2, 3, 4]
    model, tokenizer = load(str(checkpoint))  # batched by length, each record still names its own prompt
    alone = Generator(model, tokenizer, config_for("autoregressive", -1, -1, max_steps=16))
    assert [r["autoregressive"]["text"] for r in result["results"]] == [alone.generate(p).text for p in texts]
    assert run(sweep.main, common + ["--sample", "False", "--exit_layer_first", "2", "--exit_layer_last", "3",
                                     "--num_speculations_first", "2", "--num_speculations_last", "2", "--output_dir",
                                     str(tmp_path / "s")]) == 0
    rows = list(csv.DictReader((tmp_path / "s" / "sweep.csv").open()))
    assert len(rows) == 2 and all(r["outputs_differing_from_baseline"] == "0" for r in rows)


def test_caches_kept_for_cuda_graphs_give_the_tokens_of_fresh_ones(model):
    """With CUDA graphs a generator keeps one cache per (rows, capacity bucket), reused emptied by the next
    generation of that size, and rows stay in the batch when they stop. The same bookkeeping forced on the CPU
    gives the tokens, drafts and acceptances of fresh caches and shrinking batches."""
    from self_speculation.layers import capacity_bucket

    assert [capacity_bucket(n) for n in (1, 256, 257, 600, 1024)] == [256, 256, 512, 1024, 1024]
    config = config_for("self_speculative", 2, 4)
    fresh, kept = Generator(model, None, config), Generator(model, None, config)
    kept.graphs = True
    for prompts in (PROMPTS, PROMPTS[:2], PROMPTS[1:], PROMPTS[:2]):
        assert [counts(r) for r in kept.generate_batch(prompts)] == [counts(r) for r in fresh.generate_batch(prompts)]
    assert set(kept.caches) == {(5, 256), (2, 256), (4, 256)} and not fresh.caches


def test_the_cuda_graph_configuration_compiles_and_keeps_the_tokens_on_the_cpu(gqa_tied):
    """The CUDA-graph configuration forced on the CPU: mode="reduce-overhead", static-address buffers in capacity
    buckets, caches reused, finished rows held, outputs copied out. Inductor compiles it and, on the CPU, runs the
    graphs without capturing them; the tokens are those of eager decoding, and one compilation of each pass
    serves the batches."""
    config = config_for("self_speculative", 3, 4, max_steps=24)
    alone = [Generator(gqa_tied, None, config).generate_ids(p).tokens for p in PROMPTS]
    generator = Generator(gqa_tied, None, dataclasses.replace(config, compile=True))
    generator.compiled.graphs = generator.graphs = True
    for rows in ([0, 1, 2, 3, 4], [2, 0], [1, 3, 4, 0, 2]):
        assert [r.tokens for r in generator.generate_batch([PROMPTS[i] for i in rows])] == [alone[i] for i in rows]
    assert set(generator.compiled.passes) == {(0, 3, 1, True), (3, 6, 5, True)}
    assert set(generator.caches) == {(5, 256), (2, 256)}
