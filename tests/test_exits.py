"""exits.py end to end on a tiny checkpoint: the per-exit table, the predicted grid and its best point, reused
pass costs, bad input."""

import csv
import json

import pytest

import exits
from arguments import run
from models import save_tiny_checkpoint


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
    assert costs["num_layers"] == 6 and set(costs["costs"]) == {"1", "2", "3", "4", "5"}

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
    costs.write_text(json.dumps({"num_layers": 24, "costs": {}}))
    for argv, fragment in [
        (["--pass_costs", str(tmp_path / "missing.json")], "--pass_costs"),
        (["--max_speculations", "0"], "--max_speculations"),
        (["--models", "facebook/layerskip-llama3.2-1B", "--recommend", "True"], "--recommend"),
        (["--models", str(checkpoint), str(checkpoint), "--recommend", "True"], "--recommend"),
        (["--models", str(checkpoint), "--exit_layers", "6"], "--exit_layers"),
        (["--models", str(checkpoint), "--num_samples", "1", "--max_steps", "4", "--pass_costs", str(costs)],
         "another model shape"),
    ]:
        assert run(exits.main, argv + ["--output_dir", str(tmp_path)]) == 2
        assert fragment in capsys.readouterr().err
