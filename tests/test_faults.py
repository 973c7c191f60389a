"""Faults around a run rather than bad flags: a full disk (a small real filesystem, or /dev/full), runs that share
an output directory. What must hold: one line naming the file and what was kept, no torn file that blocks a rerun,
no run's results mixed with another's."""

import fcntl
import json
import subprocess

import pytest

import benchmark
import correctness
import sweep
from arguments import run
from self_speculation import results
from self_speculation.errors import UsageError

PAGE = 4096  # tmpfs counts its size in pages


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(pages): a directory on a tmpfs that holds `pages` pages of file data (mounting needs root, as
    CI runs; elsewhere the test is skipped)."""
    mounted = []

    def make(pages: int):
        mount = tmp_path / f"disk{len(mounted)}"
        mount.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * PAGE}", "tmpfs", str(mount)],
                              capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()})")
        mounted.append(mount)
        return mount

    yield make
    for mount in mounted:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "def f(x):"}\n{"prompt": "import os"}\n')
    return str(path)


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in captured.err, captured.err
    return lines[-1]


def test_a_line_that_cannot_be_written_whole_is_not_written_at_all(small_disk):
    disk = small_disk(1)
    path = disk / "records.jsonl"
    written = 0
    with pytest.raises(UsageError, match="cannot write .*records.jsonl .No space left on device.; the records before"):
        while True:
            results.append_jsonl(path, {"text": "x" * 700})
            written += 1
    lines = path.read_text().splitlines()
    assert len(lines) == written > 0 and all(json.loads(line) == {"text": "x" * 700} for line in lines)
    with pytest.raises(UsageError, match="cannot write /dev/full"):  # a device that is always full
        results.append_line(results.Path("/dev/full"), "line\n")


def test_a_summary_that_cannot_be_written_leaves_no_temporary_file(small_disk):
    disk = small_disk(1)
    with pytest.raises(UsageError, match=r"cannot write .*summary.json \(No space left on device\); kept"):
        results.write_json(disk / "summary.json", {"text": "x" * 2 * PAGE}, kept="kept")
    assert list(disk.iterdir()) == []


def test_benchmark_on_a_full_disk_prints_its_table_and_keeps_its_records(checkpoint, prompts, small_disk, capsys):
    """One page holds the records (about 1.5 KiB) but not the summary JSON as well."""
    out = small_disk(1)
    code = run(benchmark.main, ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", prompts,
                                "--max_steps", "4", "--sample", "False", "--output_dir", str(out)])
    assert code == 2
    table = capsys.readouterr()
    assert "| autoregressive |" in table.out
    line = table.err.strip().splitlines()[-1]
    [records] = out.glob("benchmark_*.jsonl")
    assert line.startswith("error: cannot write ") and "benchmark_" in line and "No space left on device" in line
    assert f"every record is in {records}" in line
    assert [json.loads(r)["prompt_id"] for r in records.read_text().splitlines()] == [0, 1]
    assert not list(out.glob("*.tmp"))


def test_a_sweep_whose_plots_cannot_be_written_prints_its_table_and_keeps_its_csv(checkpoint, prompts, small_disk,
                                                                                  capsys):
    """Three pages hold sweep_config.json, sweep_baseline.json and sweep.csv; the plots find the disk full. A
    rerun measures nothing again and says the same."""
    out = small_disk(3)
    argv = ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", prompts, "--max_steps", "4",
            "--sample", "False", "--exit_layer_first", "1", "--exit_layer_last", "2", "--num_speculations_last", "2",
            "--output_dir", str(out)]
    for _ in range(2):
        assert run(sweep.main, argv) == 2
        captured = capsys.readouterr()
        assert "best: exit_layer" in captured.out
        line = captured.err.strip().splitlines()[-1]
        assert line.startswith("error: cannot write the plots") and "sweep.csv are complete" in line, line
        rows = (out / "sweep.csv").read_text().splitlines()
        assert len(rows) == 1 + 4 and all(row.count(",") == rows[0].count(",") for row in rows)


def test_runs_started_in_the_same_second_keep_their_own_files(checkpoint, prompts, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(results.time, "strftime", lambda _: "20261201_120000")  # the same second for every run
    out = tmp_path / "out"
    for main in (benchmark.main, benchmark.main, correctness.main, correctness.main):
        assert run(main, ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", prompts,
                          "--max_steps", "4", "--sample", "False", "--exit_layer", "3", "--num_speculations", "2",
                          "--output_dir", str(out)]) == 0, capsys.readouterr().err
    for prefix in ("benchmark", "correctness"):
        documents = sorted(out.glob(f"{prefix}_20261201_120000_*.json"))
        assert len(documents) == 2
        for document in documents:
            run_id = json.loads(document.read_text())["run_id"]
            assert run_id == document.stem
            records = [json.loads(line) for line in document.with_suffix(".jsonl").read_text().splitlines()]
            assert len(records) == 2 and {r["run_id"] for r in records} == {run_id}


def test_a_second_sweep_in_a_directory_in_use_is_refused(checkpoint, prompts, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with (out / "sweep.lock").open("w") as held:  # as a running sweep holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        argv = ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", prompts, "--max_steps", "4",
                "--sample", "False", "--exit_layer_last", "1", "--num_speculations_last", "1",
                "--output_dir", str(out)]
        assert run(sweep.main, argv) == 2
        assert "another sweep is running there" in error_line(capsys)
        assert sorted(p.name for p in out.iterdir()) == ["sweep.lock"]
    assert run(sweep.main, argv) == 0  # once the other sweep has ended
