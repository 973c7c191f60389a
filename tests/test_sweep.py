"""sweep.py: a CSV row per point as it finishes; an interrupted sweep resumes without losing or repeating points."""

import csv

import pytest

import sweep
from arguments import run
from self_speculation import benchmarking


@pytest.fixture
def argv(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n{"prompt": "import os"}\n')
    return ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", str(prompts), "--max_steps", "8",
            "--sample", "False", "--exit_layer_first", "1", "--exit_layer_last", "3", "--num_speculations_first", "1",
            "--num_speculations_last", "2", "--output_dir", str(tmp_path / "out")]


def points(path, policy="static"):
    return [(int(r["exit_layer"]), int(r["num_speculations"])) for r in csv.DictReader(path.open())
            if r["draft_policy"] == policy]


def test_interrupted_sweep_resumes_with_every_point_once(argv, tmp_path, monkeypatch, capsys):
    real = benchmarking.RUNNERS["self_speculative"]
    built = []

    def interrupt_at_the_fourth_point(*args):
        built.append(args[2])
        if len(built) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setitem(sweep.RUNNERS, "self_speculative", interrupt_at_the_fourth_point)
    assert run(sweep.main, argv) == 130
    csv_path = tmp_path / "out" / "sweep.csv"
    assert points(csv_path) == [(1, 1), (1, 2), (2, 1)]

    monkeypatch.setitem(sweep.RUNNERS, "self_speculative", real)
    assert run(sweep.main, argv) == 0
    assert sorted(points(csv_path)) == [(e, d) for e in (1, 2, 3) for d in (1, 2)]
    rows = list(csv.DictReader(csv_path.open()))
    assert all(r["outputs_differing_from_baseline"] == "0" for r in rows)  # greedy: lossless at every point
    for name in ("sweep_tokens_per_second", "sweep_acceptance", "sweep_speedup"):
        assert (tmp_path / "out" / f"{name}.png").exists() and (tmp_path / "out" / f"{name}.pdf").exists()
    assert "best: exit_layer" in capsys.readouterr().out


def test_resuming_with_other_flags_is_refused_naming_them(argv, capsys, checkpoint, monkeypatch):
    assert run(sweep.main, argv) == 0
    assert run(sweep.main, argv + ["--max_steps", "9"]) == 2
    assert "other flags (--max_steps 8, here 9); resume with its flags" in capsys.readouterr().err
    monkeypatch.chdir(checkpoint.parent)  # the same model, written relative to where the command runs
    relative = [checkpoint.name if a == str(checkpoint) else a for a in argv]
    assert run(sweep.main, relative) == 0


def test_a_rejected_command_leaves_the_directory_free(argv, tmp_path, capsys):
    bad = argv + ["--exit_layer_first", "30", "--exit_layer_last", "31"]
    assert run(sweep.main, bad) == 2
    assert "--exit_layer_first must be <= 5" in capsys.readouterr().err
    assert not (tmp_path / "out" / "sweep_config.json").exists()
    assert run(sweep.main, argv) == 0  # the corrected command is not taken for another sweep


def test_a_torn_last_row_is_measured_again(argv, tmp_path):
    assert run(sweep.main, argv) == 0
    csv_path = tmp_path / "out" / "sweep.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[:4]) + lines[4][:12])  # killed while writing the fourth point's row
    assert run(sweep.main, argv) == 0
    assert sorted(points(csv_path)) == [(e, d) for e in (1, 2, 3) for d in (1, 2)]
    assert len(csv_path.read_text().splitlines()) == 7


def test_a_moved_sweep_resumes_where_it_is(argv, tmp_path, monkeypatch):
    assert run(sweep.main, argv) == 0
    (tmp_path / "out").rename(tmp_path / "moved")
    built = []
    monkeypatch.setitem(sweep.RUNNERS, "self_speculative", lambda *args: built.append(args))
    moved = argv[:-1] + [str(tmp_path / "moved")]
    assert run(sweep.main, moved) == 0
    assert built == []  # every point was found finished


def test_the_summary_of_a_best_point_without_drafts_says_so(tmp_path):
    """A point whose outputs all ended before a draft has no acceptance rate: 'no drafts', not 'acceptance nan%'."""
    import pandas as pd

    from self_speculation.sweeping import COLUMNS, Point, SweepDirectory

    directory = SweepDirectory(tmp_path / "sweep", {})
    row = dict.fromkeys(COLUMNS, 0.0) | {"exit_layer": 2, "num_speculations": 1, "draft_policy": "static", "tokens_per_second": 7.0,
                                         "speedup_vs_baseline": 0.9, "speedup_vs_autoregressive": 1.1,
                                         "acceptance_rate": float("nan")}
    directory.frame = lambda points: pd.DataFrame([row])
    summary = directory.report([Point(2, 1)], {"tokens_per_second": 8.0}, greedy=False).splitlines()[-1]
    assert summary.endswith("best: exit_layer 2, num_speculations 1: 7.0 tokens/s (0.90x hf_generate, 1.10x our "
                            "autoregressive decoding timed in turn), no drafts")


def test_every_point_is_timed_in_turn_with_autoregressive_decoding(argv, tmp_path, monkeypatch):
    """At every point, after its warm-up, batch by batch, the point's strategy and our autoregressive decoding run
    one after the other, in alternating order; the speedup is the ratio of their speeds."""
    argv = argv + ["--batch_size", "1", "--exit_layer_last", "2", "--num_speculations_last", "1"]
    calls = []
    real = benchmarking.Runner.run_batch

    def logged(runner, batch, index=0):
        calls.append((runner.generator.strategy.name if runner.generator else "hf_generate", index))
        return real(runner, batch, index)

    monkeypatch.setattr(benchmarking.Runner, "run_batch", logged)
    assert run(sweep.main, argv) == 0
    ours = [c for c in calls if c[0] != "hf_generate"]
    point = [("self_speculative", 0),  # the point's warm-up (with --compile, its compilation)
             ("self_speculative", 0), ("autoregressive", 0), ("autoregressive", 1), ("self_speculative", 1)]
    assert ours == [("autoregressive", 0)] + point + point  # autoregressive warmed up once; two points of 2 prompts
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    for r in rows:
        assert float(r["speedup_vs_autoregressive"]) == pytest.approx(
            float(r["tokens_per_second"]) / float(r["autoregressive_tokens_per_second"]))

    calls.clear()
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "plain")
    assert run(sweep.main, argv + ["--autoregressive_each_point", "False"]) == 0
    assert {c[0] for c in calls} == {"hf_generate", "self_speculative"}
    assert all(r["speedup_vs_autoregressive"] == "" for r in csv.DictReader((tmp_path / "plain" / "sweep.csv").open()))


def test_the_best_point_is_the_fastest_against_autoregressive_decoding_timed_beside_it(tmp_path):
    """Point (3, 1) ran at more tokens/s, but at a fast moment of the machine: against autoregressive decoding timed
    in turn with each point, (2, 2) is the faster setting. Without that speedup at every point, tokens/s decide."""
    import pandas as pd

    from self_speculation.sweeping import COLUMNS, Point, SweepDirectory

    directory = SweepDirectory(tmp_path / "sweep", {})
    rows = [dict.fromkeys(COLUMNS, 0.0) | {"exit_layer": e, "num_speculations": d, "draft_policy": "static",
                                           "tokens_per_second": tps,
                                           "speedup_vs_autoregressive": speedup, "acceptance_rate": 0.5}
            for e, d, tps, speedup in ((2, 2, 300.0, 1.4), (3, 1, 400.0, 1.1))]
    directory.frame = lambda points: pd.DataFrame(rows)
    summary = directory.report([Point(2, 2), Point(3, 1)], {"tokens_per_second": 8.0}, greedy=False).splitlines()[-1]
    assert "best: exit_layer 2, num_speculations 2: 300.0 tokens/s" in summary
    rows[0]["speedup_vs_autoregressive"] = float("nan")  # a point measured with --autoregressive_each_point False
    summary = directory.report([Point(2, 2), Point(3, 1)], {"tokens_per_second": 8.0}, greedy=False).splitlines()[-1]
    assert "best: exit_layer 3, num_speculations 1: 400.0 tokens/s" in summary and "timed in turn" not in summary


def test_a_batched_point_is_ranked_by_all_its_tokens_over_all_its_time(tmp_path):
    """Batches of 20 tokens in 1 s, 1 s and 4 s: the point made 10 tokens/s, though its median batch made 20 (the
    benchmark's headline; the median stays beside it)."""
    from self_speculation import GenerationConfig
    from self_speculation.benchmarking import Sample
    from self_speculation.sweeping import COLUMNS, SweepDirectory

    directory = SweepDirectory(tmp_path, {})
    directory.start()
    samples = [Sample("self_speculative", i, [1] * 10, t, batch=i // 2) for i, t in enumerate([1, 1, 1, 1, 4, 4])]
    plain = [Sample("autoregressive", i, [1] * 10, 2 * t, batch=i // 2) for i, t in enumerate([1, 1, 1, 1, 4, 4])]
    point = GenerationConfig(sample=True, exit_layer=2, num_speculations=1)
    directory.write_point(None, point, samples, [], {"tokens_per_second": 4.0}, plain)
    [row] = csv.DictReader(directory.csv_path.open())
    assert list(row) == COLUMNS
    assert float(row["tokens_per_second"]) == 10 and float(row["tokens_per_second_median"]) == 20
    assert float(row["speedup_vs_baseline"]) == 2.5 and float(row["speedup_vs_autoregressive"]) == 2


@pytest.mark.parametrize("name, content, fragment", [
    ("sweep_config.json", "[1, 2]", "sweep_config.json: expected a JSON object, found list; use another --output_dir"),
    ("sweep_config.json", "{not json", "sweep_config.json: not readable JSON"),
    ("sweep_baseline.json", '{"tokens_per_second": "fast", "outputs": []}', "sweep_baseline.json: expected "
     "tokens_per_second and the outputs of the 2 prompts; delete it"),
    ("sweep_baseline.json", '{"tokens_per_second": 9.0, "outputs": [[1, 2]]}', "the outputs of the 2 prompts"),
])
def test_a_sweep_directorys_files_edited_by_hand_are_refused_in_one_line(argv, tmp_path, capsys, name, content,
                                                                         fragment):
    quick = argv[:argv.index("--exit_layer_last") + 1] + ["1"] + argv[argv.index("--exit_layer_last") + 2:]
    assert run(sweep.main, quick) == 0
    capsys.readouterr()
    (tmp_path / "out" / name).write_text(content)
    assert run(sweep.main, quick) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert error.startswith("error: ") and fragment in error, error


def test_a_sweep_of_draft_policies_measures_the_adaptive_one_at_every_exit_layer(argv, tmp_path, capsys):
    """--draft_policy static,adaptive: the static grid, and a point per exit layer under the adaptive policy (its
    first step drafting --num_speculations_first), each policy's best and the overall best named, a plot of both
    by exit layer; greedy outputs equal the baseline's under both."""
    built = []
    real = benchmarking.RUNNERS["self_speculative"]

    def recorded(*args):
        built.append((args[2].exit_layer, args[2].num_speculations, args[2].draft_policy, args[2].batch_drafts))
        return real(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sweep.RUNNERS, "self_speculative", recorded)
        assert run(sweep.main, argv + ["--draft_policy", "static,adaptive"]) == 0
    csv_path = tmp_path / "out" / "sweep.csv"
    assert sorted(points(csv_path)) == [(e, d) for e in (1, 2, 3) for d in (1, 2)]
    assert sorted(points(csv_path, "adaptive")) == [(1, 1), (2, 1), (3, 1)]
    assert sorted(built) == sorted([(e, d, "static", False) for e in (1, 2, 3) for d in (1, 2)]
                                   + [(e, 1, "adaptive", True) for e in (1, 2, 3)])
    assert all(r["outputs_differing_from_baseline"] == "0" for r in csv.DictReader(csv_path.open()))
    out = capsys.readouterr().out
    assert "best static: exit_layer" in out and "best adaptive: exit_layer" in out
    assert "\nbest: exit_layer" in out and ("(static):" in out or "(adaptive):" in out)
    assert (tmp_path / "out" / "sweep_policies.png").exists() and (tmp_path / "out" / "sweep_tokens_per_second.png").exists()
    assert run(sweep.main, argv + ["--draft_policy", "static,fast"]) == 2
    assert "--draft_policy: unknown fast (choose from static, adaptive)" in capsys.readouterr().err
    alone = argv[:-1] + [str(tmp_path / "adaptive"), "--draft_policy", "adaptive"]
    assert run(sweep.main, alone) == 0
    assert "warning: --num_speculations_last ignored: without the static grid" in capsys.readouterr().err
    assert sorted(points(tmp_path / "adaptive" / "sweep.csv", "adaptive")) == [(1, 1), (2, 1), (3, 1)]
