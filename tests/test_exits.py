"""exits.py end to end on a tiny checkpoint: the per-exit table, the predicted grid and its best point, reused
pass costs, bad input."""

import csv
import re
import json

import pytest

import exits
from arguments import run
from models import save_tiny_checkpoint
from self_speculation.analysis import save_costs
from self_speculation.costs import PassCosts
from self_speculation.loading import load


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    save_tiny_checkpoint(directory, max_position_embeddings=1024)
    return directory


def test_report_predictions_and_reused_costs(checkpoint, tmp_path, capsys):
    argv = ["--models", str(checkpoint), "--labels", "tiny", "--num_samples", "2", "--max_steps", "12",
            "--max_speculations", "3", "--num_speculations", "2", "--output_dir", str(tmp_path / "a")]
    assert run(exits.main, argv) == 0
    out = capsys.readouterr().out
    assert "tiny: predicted best exit_layer" in out
    table = list(csv.DictReader((tmp_path / "a" / "exits.csv").open()))
    assert [int(r["exit_layer"]) for r in table] == [1, 2, 3, 4, 5]
    grid = list(csv.DictReader((tmp_path / "a" / "predictions.csv").open()))
    assert len(grid) == 5 * 3
    best = max(grid, key=lambda r: float(r["speedup"]))
    assert f"exit_layer {best['exit_layer']}, num_speculations {best['num_speculations']}" in out
    costs = json.loads((tmp_path / "a" / "pass_costs.json").read_text())
    assert costs["key"]["shape"]["num_hidden_layers"] == 6 and set(costs["costs"]) == {"1", "2", "3", "4", "5"}
    assert costs["key"]["dtype"] == "float32" and costs["key"]["device"] == "cpu"

    again = argv[:-1] + [str(tmp_path / "b"), "--pass_costs", str(tmp_path / "a" / "pass_costs.json")]
    assert run(exits.main, again) == 0
    capsys.readouterr()
    assert list(csv.DictReader((tmp_path / "b" / "predictions.csv").open())) == grid
    assert not (tmp_path / "b" / "pass_costs.json").exists()

    assert run(exits.main, again + ["--recommend", "True"]) == 0
    capsys.readouterr()
    recommended = json.loads((checkpoint / "config.json").read_text())["layerskip"]
    assert recommended == {"exit_layer": int(best["exit_layer"]), "num_speculations": int(best["num_speculations"])}


def test_bad_input(checkpoint, tmp_path, capsys):
    costs = tmp_path / "pass_costs.json"
    costs.write_text(json.dumps({"num_layers": 24, "costs": {}}))  # an older version's file: no key
    for argv, fragment in [
        (["--pass_costs", str(tmp_path / "missing.json")], "--pass_costs"),
        (["--max_speculations", "0"], "--max_speculations"),
        (["--models", "facebook/layerskip-llama3.2-1B", "--recommend", "True"], "--recommend"),
        (["--models", str(checkpoint), str(checkpoint), "--labels", "a", "b", "--recommend", "True"], "--recommend"),
        (["--models", str(checkpoint), "--exit_layers", "6"], "--exit_layers"),
        (["--models", str(checkpoint), "--num_samples", "1", "--max_steps", "4", "--pass_costs", str(costs)],
         "not a pass_costs.json"),
        (["--max_speculations", "2", "--num_speculations", "3"], "--num_speculations must be an integer in [1, 2]"),
    ]:
        assert run(exits.main, argv + ["--output_dir", str(tmp_path)]) == 2
        assert fragment in capsys.readouterr().err


@pytest.fixture
def saved_costs(checkpoint, tmp_path):
    """A pass_costs.json for the tiny model as exits.py writes it, with made-up costs (nothing is timed)."""
    model, _ = load(str(checkpoint))
    cost = PassCosts(draft=1e-3, verify={t: 2e-3 + 1e-4 * t for t in range(1, 10)}, full=3e-3,
                     head={t: 1e-4 * t for t in range(1, 10)})
    path = tmp_path / "pass_costs.json"
    save_costs(path, str(checkpoint), model, 8, {e: cost for e in range(1, 6)})
    return path


def test_pass_costs_of_another_shape_dtype_or_device_are_refused(checkpoint, saved_costs, tmp_path, capsys):
    """Costs depend on the shape, not the depth alone: a model as deep but 8x narrower costs far less per pass."""
    saved = json.loads(saved_costs.read_text())
    argv = ["--models", str(checkpoint), "--num_samples", "1", "--max_steps", "4", "--output_dir", str(tmp_path)]
    for change, fragment in [({"shape": saved["key"]["shape"] | {"hidden_size": 8}}, "(hidden_size 8 here 64)"),
                             ({"dtype": "bfloat16"}, "dtype bfloat16 here float32"),
                             ({"device": "NVIDIA H200"}, "device NVIDIA H200 here cpu"),
                             ({"max_speculations": 1}, "up to 1, fewer than --max_speculations 8")]:
        other = tmp_path / "other.json"
        other.write_text(json.dumps(saved | {"key": saved["key"] | change}))
        assert run(exits.main, argv + ["--pass_costs", str(other)]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: --pass_costs") and fragment in error, error


def test_the_best_draft_length_is_within_max_speculations(checkpoint, saved_costs, tmp_path, capsys):
    """The acceptance column's default draft length (4) used to join the grid when --max_speculations was smaller."""
    argv = ["--models", str(checkpoint), "--num_samples", "1", "--max_steps", "8", "--max_speculations", "2",
            "--pass_costs", str(saved_costs), "--output_dir", str(tmp_path)]
    assert run(exits.main, argv) == 0
    out = capsys.readouterr().out
    assert "(d=2)" in out
    grid = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert {int(r["num_speculations"]) for r in grid} == {1, 2}
    assert re.search(r"predicted best exit_layer \d+, num_speculations [12]:", out), out


@pytest.mark.parametrize("edit", [lambda c: c | {"draft": "0.001"}, lambda c: c | {"verify": [0.002, 0.003]},
                                  lambda c: c | {"head": {"1": "x"}}, lambda c: [c], lambda c: c | {"full": -1.0},
                                  lambda c: c | {"verify": {"1": 0.002}}])
def test_hand_edited_pass_costs_are_refused_in_one_line(checkpoint, saved_costs, tmp_path, capsys, edit):
    """Strings, lists, negative seconds or a missing verified length: a line naming the file and the exit layer,
    not a TypeError after the model was loaded."""
    saved = json.loads(saved_costs.read_text())
    saved["costs"]["2"] = edit(saved["costs"]["2"])
    other = tmp_path / "edited.json"
    other.write_text(json.dumps(saved))
    argv = ["--models", str(checkpoint), "--num_samples", "1", "--max_steps", "4", "--max_speculations", "2",
            "--pass_costs", str(other), "--output_dir", str(tmp_path)]
    assert run(exits.main, argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: --pass_costs {other}: the costs of exit layer 2 are not seconds"), error


def test_two_models_keep_their_own_pass_costs_and_duplicate_labels_are_refused(checkpoint, tmp_path, capsys):
    argv = ["--models", str(checkpoint), str(checkpoint), "--num_samples", "1", "--max_steps", "4",
            "--max_speculations", "2", "--exit_layers", "2", "--output_dir", str(tmp_path)]
    assert run(exits.main, argv + ["--labels", "a", "a"]) == 2
    assert "--labels names a twice" in capsys.readouterr().err
    assert run(exits.main, argv) == 2
    assert "give --labels" in capsys.readouterr().err
    assert run(exits.main, argv + ["--labels", "a", "b/c"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.glob("pass_costs*.json")) == ["pass_costs_a.json", "pass_costs_b_c.json"]
    header = next(csv.reader((tmp_path / "exits.csv").open()))
    assert any(c.startswith("a ") for c in header) and any(c.startswith("b/c ") for c in header), header


@pytest.mark.parametrize("content", ['{"key": "cpu", "costs": {}}', '[1]', '{"key": {}, "costs": [1]}'])
def test_a_pass_costs_file_of_another_form_is_refused_in_one_line(checkpoint, tmp_path, capsys, content):
    other = tmp_path / "other.json"
    other.write_text(content)
    argv = ["--models", str(checkpoint), "--num_samples", "1", "--max_steps", "4", "--pass_costs", str(other),
            "--output_dir", str(tmp_path)]
    assert run(exits.main, argv) == 2
    assert "not a pass_costs.json written by exits.py" in capsys.readouterr().err
