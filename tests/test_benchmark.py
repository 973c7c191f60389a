"""benchmark.py: every strategy on the same prompts, one valid JSON document, per-sample JSONL."""

import dataclasses
import json

import pytest
import torch

import arguments
import benchmark
from arguments import pop_list, run
from self_speculation import layers
from self_speculation.costs import PassCosts, PassTimer
from self_speculation.strategies import SelfSpeculative
from self_speculation.loading import load
from self_speculation.errors import UsageError

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
                                "--generation_strategy", ",".join(STRATEGIES.split(",")[:3]),
                                "--generation_strategy", ",".join(STRATEGIES.split(",")[2:])])  # given twice
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
    # the speculation's own gain is reported against its ideal, and its cache against autoregressive decoding's
    spec = metrics["self_speculative"]
    assert spec["ideal_speedup_vs_autoregressive"] > 0 and spec["efficiency"] > 0
    # the efficiency compares like with like: the steps after the prompt's pass, which the ideal counts
    assert spec["decode_speedup_vs_autoregressive"] == pytest.approx(
        metrics["autoregressive"]["ms_per_token_after_first"] / spec["ms_per_token_after_first"])
    assert spec["efficiency"] == pytest.approx(
        spec["decode_speedup_vs_autoregressive"] / spec["ideal_speedup_vs_autoregressive"])
    assert spec["speedup_vs_autoregressive"] == pytest.approx(
        spec["tokens_per_second"] / metrics["autoregressive"]["tokens_per_second"])
    # every strategy of ours is priced by its steps, early_exit too, which makes no full-model pass
    for name in ("autoregressive", "early_exit", "self_speculative"):
        predicted, measured = (metrics[name][k] for k in ("predicted_ms_per_token_after_first",
                                                          "ms_per_token_after_first"))
        assert 0.1 < predicted / measured < 10, (name, predicted, measured)
    assert 1.0 <= spec["kv_cache_vs_autoregressive"] <= 1.25  # room for one step's drafts (3 of 16+ positions)
    assert "ideal speedup over autoregressive" in out and "efficiency" in out


def test_ideal_speedup_by_hand():
    """L = 4 layers of unit cost over one position and 1.5 over three, exit at E = 1; head cost 0.5 over one
    position and 1 over three: a step of two drafts costs 3 * 1 + 3 * 1.5 + 2 * 0.5 + 1 = 9.5 and yields
    accepted + 1 = 3 tokens; an autoregressive token costs 4 + 0.5."""
    costs = PassCosts(draft=1.0, verify={1: 3.0, 2: 3.75, 3: 4.5}, full=4.0, head={1: 0.5, 2: 0.75, 3: 1.0})
    assert SelfSpeculative().ideal_speedup(costs, {2: 10}, tokens=30) == pytest.approx(3 * 4.5 / 9.5)
    # one draft per step, half of them accepted: 2 * 1 + 3.75 + 0.5 + 0.75 = 7 for 1.5 tokens
    assert SelfSpeculative().ideal_speedup(costs, {1: 10}, tokens=15) == pytest.approx(1.5 * 4.5 / 7)
    # each step at its own length: a step without drafts is a full pass and the head (3.5 + 0.5 here, where the
    # full pass is cheaper than layers [0, E) and [E, L) apart), not a step of a mean of one draft (7 each)
    cheap = dataclasses.replace(costs, full=3.5)
    assert SelfSpeculative().ideal_speedup(cheap, {0: 5, 2: 5}, tokens=20) == pytest.approx(20 * 4 / (5 * 4 + 5 * 9.5))
    # a mean of 1.5 drafts interpolates the costs over 2.5 positions
    assert costs.at(costs.verify, 2.5) == pytest.approx(4.125)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_pass_costs_are_measured_for_each_pass(checkpoint, compiled):
    model, _ = load(str(checkpoint))
    decoder = layers.Decoder(model)
    passes = layers.CompiledPasses(decoder, {(0, 2, 1), (2, 6, 3), (0, 6, 1)}) if compiled else None
    costs = PassTimer(decoder, context=8, max_positions=3, compiled=passes, repeats=3).costs(2, 3)
    assert not compiled or passes.shapes_run == {(0, 2, 1), (2, 6, 3), (0, 6, 1)}
    assert set(costs.verify) == set(costs.head) == {1, 2, 3}
    assert all(t > 0 for t in [costs.draft, costs.full, *costs.verify.values(), *costs.head.values()])


def test_on_cuda_passes_are_timed_by_events_with_one_sync_each(checkpoint, monkeypatch):
    """The CUDA path run on the CPU with fake events: a pass and its head are timed between three recorded events
    (the device's clock), and the host waits once per pass, after the last, not after each part."""
    import time

    waits = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = time.perf_counter()

        def synchronize(self):
            waits.append(self)

        def elapsed_time(self, end):
            return 1000 * (end.at - self.at)  # milliseconds, as CUDA's

    model, _ = load(str(checkpoint))
    timer = PassTimer(layers.Decoder(model), context=8, max_positions=2, repeats=1)
    hidden = timer.decoder.embed(timer.tokens(2))
    timer.device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "Event", Event)
    with torch.inference_mode():  # as `samples` runs it
        layers_time, head_time = timer.once(0, 6, hidden, with_head=True)
    assert layers_time > 0 and head_time > 0 and len(waits) == 1


def test_unknown_strategy(capsys):
    assert run(benchmark.main, ["--generation_strategy", "autoregressive,medusa"]) == 2
    assert "medusa" in capsys.readouterr().err


def test_pop_list():
    argv = ["--a", "1", "--generation_strategy", "x,y", "--b=2"]
    assert pop_list(argv, "--generation_strategy", "z") == ["x", "y"] and argv == ["--a", "1", "--b=2"]
    assert pop_list(argv, "--b", "z") == ["2"] and argv == ["--a", "1"]
    assert pop_list(argv, "--c", "z") == ["z"]
    for dashed in (["--generation-strategy", "x,y"], ["--generation-strategy=x,y"]):  # argparse's other spelling
        assert pop_list(dashed, "--generation_strategy", "z") == ["x", "y"] and dashed == []
    # given twice, the flag used to keep its first value only (and the JSON recorded both)
    repeated = ["--generation_strategy", "x", "--n", "1", "--generation_strategy=y,x"]
    assert pop_list(repeated, "--generation_strategy", "z") == ["x", "y"] and repeated == ["--n", "1"]
    with pytest.raises(UsageError, match="an empty name"):
        pop_list(["--generation_strategy", "x,,y"], "--generation_strategy", "z")


def test_with_compile_the_hf_baseline_is_hugging_faces_compiled_decoding(checkpoint):
    from self_speculation.benchmarking import RUNNERS
    from self_speculation.config import GenerationConfig

    model, tokenizer = load(str(checkpoint))
    for compile_, expected in ((False, None), (True, "static")):
        runner = RUNNERS["hf_generate"](model, tokenizer, GenerationConfig(sample=False, compile=compile_), 0)
        assert runner.settings.get("cache_implementation") == expected
    assert runner.settings["compile_config"]["backend"] == "inductor"


def test_early_exit_needs_only_an_exit_layer(checkpoint, prompts_file, tmp_path):
    """A model with no recommended settings: early_exit takes --exit_layer alone (it once required a draft length)."""
    code = run(benchmark.main, ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path",
                                str(prompts_file), "--max_steps", "8", "--sample", "False", "--exit_layer", "4",
                                "--output_dir", str(tmp_path), "--generation_strategy", "early_exit"])
    assert code == 0
    [result] = tmp_path.glob("benchmark_*.json")
    assert json.loads(result.read_text())["settings"]["early_exit"]["exit_layer"] == 4


def test_batched_benchmark_gives_every_row_its_batch_of_one_output(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def f(x):", "import os", "x = [1,", "class A:",
                                                                           "for i in range(3):"]))
    outputs = {}
    for batch_size in (1, 2):
        out = tmp_path / f"b{batch_size}"
        code = run(benchmark.main, ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", str(prompts),
                                    "--max_steps", "12", "--sample", "False", "--exit_layer", "3", "--num_speculations",
                                    "3", "--output_dir", str(out), "--batch_size", str(batch_size),
                                    "--generation_strategy",
                                    "autoregressive,self_speculative,hf_generate,hf_assistant_early_exit,"
                                    "hf_custom_generate"])
        assert code == 0
        [records] = out.glob("benchmark_*.jsonl")
        outputs[batch_size] = {(r["strategy"], r["prompt_id"]): r["tokens"]
                               for r in map(json.loads, records.read_text().splitlines())}
        [result] = out.glob("benchmark_*.json")
        metrics = json.loads(result.read_text())["metrics"]
        assert metrics["self_speculative"]["samples"] == 5
        # our decoding through model.generate takes the batch that Hugging Face's own early-exit assistant refuses
        assert [metrics[name]["rows_per_batch"] for name in ("self_speculative", "hf_assistant_early_exit",
                                                             "hf_custom_generate")] == [batch_size, 1, batch_size]
        printed = capsys.readouterr().out
        assert ("hf_assistant_early_exit: one prompt at a time (Hugging Face's assisted generation takes a batch of "
                "one)" in printed) == (batch_size > 1)
    assert outputs[1] == outputs[2]  # three batches of 2, 2 and 1 rows; hf_generate left-padded
    assert all(outputs[2]["hf_custom_generate", i] == outputs[2]["self_speculative", i] for i in range(5))


def test_compile_both_measures_eager_and_compiled_interleaved(checkpoint, prompts_file, tmp_path, capsys):
    """`--compile both`: every strategy eager and compiled in one run, the compiled rows named NAME+compiled, the
    same greedy outputs, the compile speedup a ratio within the run, and each of ours against its passes."""
    code = run(benchmark.main, ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path",
                                str(prompts_file), "--max_steps", "8", "--sample", "False", "--exit_layer", "3",
                                "--num_speculations", "2", "--output_dir", str(tmp_path), "--compile", "both",
                                "--generation_strategy", "autoregressive,self_speculative"])
    out = capsys.readouterr().out
    assert code == 0
    [path] = tmp_path.glob("benchmark_*.json")
    result = json.loads(path.read_text())
    metrics = result["metrics"]
    names = ["autoregressive", "autoregressive+compiled", "self_speculative", "self_speculative+compiled"]
    assert list(metrics) == names and result["arguments"]["variants"] == ["+compiled", "+compiled"]
    assert [result["settings"][name]["compile"] for name in names] == [False, True, False, True]
    records = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    outputs = {(r["strategy"], r["prompt_id"]): r["tokens"] for r in records}
    assert all(outputs[name, i] == outputs["autoregressive", i] for name in names for i in range(3))
    for name in ("autoregressive", "self_speculative"):
        compiled = metrics[name + "+compiled"]
        assert compiled["speedup_vs_eager"] == pytest.approx(
            compiled["tokens_per_second"] / metrics[name]["tokens_per_second"])
        for variant in (name, name + "+compiled"):
            m = metrics[variant]
            assert m["predicted_ms_per_token_after_first"] > 0 and m["ms_per_token_after_first"] > 0
            assert m["overhead_vs_passes"] == pytest.approx(
                m["ms_per_token_after_first"] / m["predicted_ms_per_token_after_first"] - 1)
            assert f"{variant}: " in out and "ms/token after the first" in out
    # the compiled speculation is compared with compiled autoregressive decoding, not with eager
    spec = metrics["self_speculative+compiled"]
    assert spec["speedup_vs_autoregressive"] == pytest.approx(
        spec["tokens_per_second"] / metrics["autoregressive+compiled"]["tokens_per_second"])
    assert "compiled over eager, interleaved in this run: autoregressive " in out


@pytest.mark.parametrize("argv", [["--compile", "both"], ["--compile=both"]])
def test_pop_compile_both(argv):
    rest = ["--max_steps", "4"]
    assert arguments.pop_compile_both(argv + rest) is True
    assert arguments.pop_compile_both(["--compile", "True"] + rest) is False
    with pytest.raises(UsageError, match="--compile is given twice"):
        arguments.pop_compile_both(argv + ["--compile", "False"])


@pytest.mark.parametrize("argv", [["--compile", "maybe"], ["--compile=bothh"], ["--compile", "Tru"]])
def test_a_compile_value_that_is_neither_a_boolean_nor_both_names_the_three_choices(argv):
    with pytest.raises(UsageError, match=r"--compile must be True, False or both \(got '"):
        arguments.pop_compile_both(argv + ["--max_steps", "4"])


@pytest.mark.parametrize("argv", [["--compile"], ["--compile", "--max_steps", "4"], ["--compile", "yes"]])
def test_a_bare_or_boolean_compile_is_left_to_the_parser(argv):
    assert arguments.pop_compile_both(list(argv)) is False


def test_pass_costs_timed_beside_decoding_cover_every_pass(checkpoint):
    """A CostMeter keeps every timed run of every measurement: medians over batches of different sizes."""
    from self_speculation.costs import CostMeter

    from self_speculation import GenerationConfig, Generator

    model, _ = load(str(checkpoint))
    generator = Generator(model, None, GenerationConfig(sample=False))
    meter = CostMeter(generator, exit_layer=2, max_positions=3, repeats=2)
    assert meter.costs() is None
    meter.measure(rows=1, context=6)
    meter.measure(rows=3, context=9)
    costs = meter.costs()
    assert set(costs.verify) == set(costs.head) == {1, 2, 3} and len(meter.times[("full",)]) == 4
    assert all(t > 0 for t in [costs.draft, costs.full, *costs.verify.values(), *costs.head.values()])
    plain = CostMeter(generator, exit_layer=None, max_positions=1, repeats=2)
    plain.measure(rows=2, context=5)
    assert plain.costs().full > 0 and set(plain.times) == {("full",), ("head", 1)}


def test_a_compiled_row_meets_compiled_hf_generate(checkpoint):
    """With --compile both each variant has its own baseline: NAME+compiled against hf_generate+compiled."""
    from self_speculation import GenerationConfig
    from self_speculation.benchmarking import Runner, Sample
    from self_speculation.reporting import compare

    model, tokenizer = load(str(checkpoint))
    runners = {name + variant: Runner(run=None, settings={}, variant=variant, baseline=variant,
                                      siblings={"eager": ("compiled", name)} if variant else {})
               for name in ("hf_generate", "autoregressive") for variant in ("", "+compiled")}
    seconds = {"hf_generate": 4.0, "hf_generate+compiled": 2.0, "autoregressive": 2.0, "autoregressive+compiled": 1.0}
    samples = [Sample(name, 0, [1, 2, 3, 4], total) for name, total in seconds.items()]
    metrics = compare(model, tokenizer, GenerationConfig(sample=True), runners, samples, [[0, 1]], [""])
    assert [metrics[name]["speedup_vs_hf_generate"] for name in seconds] == [1.0, 1.0, 2.0, 2.0]
    assert metrics["autoregressive+compiled"]["speedup_vs_eager"] == 2.0


def test_compile_both_runs_a_runner_that_cannot_compile_once(checkpoint, prompts_file, tmp_path, capsys):
    """Hugging Face's assisted generation ignores --compile: no hf_assistant_early_exit+compiled row that would
    be eager decoding under a compiled name."""
    code = run(benchmark.main, ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path",
                                str(prompts_file), "--num_samples", "1", "--max_steps", "4", "--sample", "False",
                                "--exit_layer", "3", "--num_speculations", "2", "--output_dir", str(tmp_path),
                                "--compile", "both", "--generation_strategy", "hf_assistant_early_exit"])
    captured = capsys.readouterr()
    assert code == 0 and "hf_assistant_early_exit has no compiled variant" in captured.err
    [path] = tmp_path.glob("benchmark_*.json")
    assert list(json.loads(path.read_text())["metrics"]) == ["hf_assistant_early_exit"]


def test_compile_true_says_which_runners_run_eager(checkpoint, prompts_file, tmp_path, capsys):
    """--compile True with runners that cannot compile: they run, eager, and a warning says so once each (a flag
    they would otherwise ignore in silence), under both draft policies."""
    code = run(benchmark.main, ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path",
                                str(prompts_file), "--num_samples", "1", "--max_steps", "4", "--sample", "False",
                                "--exit_layer", "3", "--num_speculations", "2", "--output_dir", str(tmp_path),
                                "--compile", "True", "--draft_policy", "static,adaptive", "--generation_strategy",
                                "hf_assistant_early_exit,hf_custom_generate"])
    err = capsys.readouterr().err
    assert code == 0
    for name in ("hf_assistant_early_exit", "hf_custom_generate"):
        assert err.count(f"warning: {name} has no compiled variant") == 1, err
    [path] = tmp_path.glob("benchmark_*.json")
    assert list(json.loads(path.read_text())["metrics"]) == ["hf_assistant_early_exit", "hf_custom_generate+static",
                                                            "hf_custom_generate+adaptive"]


def test_the_table_marks_what_a_run_did_not_measure_with_a_bare_dash():
    """Without hf_generate in the run there is no speedup over it: '-', not '-x'; units only beside numbers."""
    from self_speculation.reporting import format_table

    common = {"tokens_per_second": 100.0, "tokens_per_second_median": 100.0, "time_per_token_median": 0.01,
              "rows_per_batch": 1}
    table = format_table({
        "autoregressive": common | {"acceptance_rate": None, "tokens_per_full_model_pass": 1.0},
        "self_speculative": common | {"acceptance_rate": 0.5, "tokens_per_full_model_pass": 2.0,
                                      "speedup_vs_hf_generate": 1.5},
    })
    autoregressive, self_speculative = table.splitlines()[2:]
    assert autoregressive == "| autoregressive | 100.0 | 10.00 | - | 1.00 | - | - |"
    assert self_speculative == "| self_speculative | 100.0 | 10.00 | 50.0% | 2.00 | 1.50x | - |"


def test_in_batches_the_headline_is_all_tokens_over_all_the_time():
    """Batches of 20 tokens in 1 s, 1 s and 4 s: 10 tokens/s in all, though the median batch made 20; one prompt at
    a time the headline stays the median over prompts."""
    from self_speculation.benchmarking import Sample
    from self_speculation.reporting import format_table, summarize

    batched = summarize([Sample("a", i, [1] * 10, t, batch=i // 2) for i, t in enumerate([1, 1, 1, 1, 4, 4])])
    assert batched["tokens_per_second"] == batched["tokens_per_second_overall"] == 10
    assert batched["tokens_per_second_median"] == 20
    alone = summarize([Sample("a", i, [1] * 10, t) for i, t in enumerate([1, 1, 4])])
    assert alone["tokens_per_second"] == alone["tokens_per_second_median"] == 10
    assert "| a | 10.0 | 20.0 |" in format_table({"a": batched | {"speedup_vs_hf_generate": None}})


def test_hugging_faces_batch_rows_end_where_they_stop_not_at_the_padding(checkpoint):
    """A row that stops on a stop word while the others go on is filled with padding (a pad token other than EOS
    here); each row is cut where it stopped, as the same prompt alone is, and counted with its own tokens only."""
    from self_speculation.benchmarking import RUNNERS
    from self_speculation.config import GenerationConfig

    model, tokenizer = load(str(checkpoint))
    model.generation_config.pad_token_id = 7
    prompts = [tokenizer(p).input_ids for p in ("def f(x):", "import os, sys")]
    config = GenerationConfig(sample=False, max_steps=12)
    free = [s.tokens for s in RUNNERS["hf_generate"](model, tokenizer, config, 0).run_together(prompts)]
    # a stop word the first row meets at its third token, before the second row meets it
    word = next(w for w in tokenizer.decode(free[0][2:3]) if w.strip() and w not in tokenizer.decode(free[1][:6]))
    runner = RUNNERS["hf_generate"](model, tokenizer, GenerationConfig(sample=False, max_steps=12, stop_words=[word]), 0)
    together = [s.tokens for s in runner.run_together(prompts)]
    assert together == [runner.run(p).tokens for p in prompts] and len(together[0]) <= 3 < len(together[1])


def test_early_exit_makes_no_full_model_pass(checkpoint):
    from self_speculation.benchmarking import RUNNERS
    from self_speculation.config import GenerationConfig

    model, tokenizer = load(str(checkpoint))
    prompt = tokenizer("def f(x):").input_ids
    config = GenerationConfig(sample=False, max_steps=6, exit_layer=2)
    assert RUNNERS["early_exit"](model, tokenizer, config, 0).run(prompt).passes == 0
    assert RUNNERS["autoregressive"](model, tokenizer, config, 0).run(prompt).passes == 6


def test_hugging_faces_assisted_generation_stops_at_stop_words(checkpoint):
    """Its assistant's own generate gets the generation config without a tokenizer, so stop words given as
    `stop_strings` ended in transformers' ValueError; as a stopping criterion both runners stop where ours do."""
    from self_speculation.benchmarking import RUNNERS
    from self_speculation.config import GenerationConfig

    model, tokenizer = load(str(checkpoint))
    prompt = tokenizer("def f(x):").input_ids
    free = RUNNERS["autoregressive"](model, tokenizer, GenerationConfig(sample=False, max_steps=12), 0).run(prompt)
    word = next(w for w in tokenizer.decode(free.tokens[3:4]) if w.strip() and w not in tokenizer.decode(free.tokens[:3]))
    config = GenerationConfig(sample=False, max_steps=12, stop_words=[word], exit_layer=2, num_speculations=2)
    ours = RUNNERS["self_speculative"](model, tokenizer, config, 0)
    for name in ("hf_generate", "hf_assistant_early_exit"):
        runner = RUNNERS[name](model, tokenizer, config, 0)
        assert runner.run(prompt).tokens == ours.run(prompt).tokens == free.tokens[:4], name
        assert runner.settings["stop_strings"] == [word]


def test_hugging_faces_baselines_get_our_budget_where_the_context_ends_first(checkpoint):
    """A prompt 3 tokens short of the context: our strategies stop there (context_length), and so must the
    baselines, or the comparison would call a budget difference a divergence. In a batch each row gets its own."""
    from self_speculation.benchmarking import RUNNERS
    from self_speculation.config import GenerationConfig

    model, tokenizer = load(str(checkpoint))
    long, short = tokenizer("def f(x):\n    return x + 1").input_ids, tokenizer("import os").input_ids
    model.config.max_position_embeddings = len(long) + 3
    config = GenerationConfig(sample=False, max_steps=10, exit_layer=2, num_speculations=2)
    ours = RUNNERS["autoregressive"](model, tokenizer, config, 0).run_together([long, short])
    assert [len(s.tokens) for s in ours] == [3, min(10, len(long) + 3 - len(short))]
    for name in ("hf_generate", "hf_assistant_early_exit"):
        runner = RUNNERS[name](model, tokenizer, config, 0)
        assert [runner.run(p).tokens for p in (long, short)] == [s.tokens for s in ours], name
    together = RUNNERS["hf_generate"](model, tokenizer, config, 0).run_together([long, short])
    assert [s.tokens for s in together] == [s.tokens for s in ours]


def test_the_quick_start_prints_no_warning_a_user_cannot_act_on(checkpoint, tmp_path):
    """transformers' assisted generation calls the assistant's generate with a generation config and generation
    arguments, and transformers then warns the user of its own deprecated call."""
    import subprocess
    import sys
    from pathlib import Path

    root, prompts = Path(__file__).resolve().parents[1], tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n{"prompt": "import os"}\n')
    done = subprocess.run([sys.executable, str(root / "benchmark.py"), "--model", str(checkpoint), "--dataset",
                           "custom_jsonl", "--data_path", str(prompts),
                           "--max_steps", "6", "--sample", "False", "--exit_layer", "2", "--num_speculations", "2",
                           "--generation_strategy", "autoregressive,self_speculative,hf_generate,hf_assistant_early_exit",
                           "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if "warn" in line.lower() or "deprecat" in line.lower()]
    assert noise == []


def test_draft_policies_run_interleaved_as_rows_of_one_run(checkpoint, prompts_file, tmp_path, capsys):
    """--draft_policy static,adaptive: self_speculative under each policy, as rows NAME+POLICY beside one
    autoregressive row; the same tokens; each policy's choices and the adaptive row's ratio over the static one."""
    code = run(benchmark.main, ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path",
                                str(prompts_file), "--max_steps", "12", "--sample", "False", "--exit_layer", "3",
                                "--num_speculations", "2", "--output_dir", str(tmp_path), "--draft_policy",
                                "static,adaptive", "--generation_strategy", "autoregressive,self_speculative"])
    out = capsys.readouterr().out
    assert code == 0
    [path] = tmp_path.glob("benchmark_*.json")
    metrics = json.loads(path.read_text())["metrics"]
    assert list(metrics) == ["autoregressive", "self_speculative+static", "self_speculative+adaptive"]
    records = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    outputs = {(r["strategy"], r["prompt_id"]): r["tokens"] for r in records}
    assert all(outputs[name, i] == outputs["autoregressive", i] for name in metrics for i in range(3))
    adaptive, static = metrics["self_speculative+adaptive"], metrics["self_speculative+static"]
    assert adaptive["draft_policy"] == "adaptive" and static["draft_policy"] == "static"
    assert adaptive["speedup_vs_static"] == pytest.approx(adaptive["tokens_per_second"] / static["tokens_per_second"])
    assert "mean_drafts_per_step" in adaptive and "drafts_per_step_histogram" in adaptive
    assert "adaptive over static, interleaved in this run: self_speculative " in out


@pytest.mark.parametrize("argv, variants", [
    (["--draft_policy", "static,adaptive"], [(("+static", "draft_policy", "static"),),
                                              (("+adaptive", "draft_policy", "adaptive"),)]),
    (["--compile", "both", "--draft_policy=adaptive,static"], [
        (("", "compile", False), ("+adaptive", "draft_policy", "adaptive")),
        (("", "compile", False), ("+static", "draft_policy", "static")),
        (("+compiled", "compile", True), ("+adaptive", "draft_policy", "adaptive")),
        (("+compiled", "compile", True), ("+static", "draft_policy", "static"))]),
    (["--max_steps", "4"], [()]),
])
def test_variants_are_parsed_in_one_place(argv, variants):
    argv = list(argv)
    assert arguments.pop_variants(argv) == variants and "--compile" not in argv and "--draft_policy" not in " ".join(argv)


def test_one_draft_policy_is_left_to_the_parser_and_an_unknown_one_is_named():
    argv = ["--draft_policy", "adaptive"]
    assert arguments.pop_variants(argv) == [()] and argv == ["--draft_policy", "adaptive"]
    with pytest.raises(UsageError, match="--draft_policy: unknown greedy"):
        arguments.pop_variants(["--draft_policy", "static,greedy"])
