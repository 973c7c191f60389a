"""Two CPU processes under torchrun split the examples; rank 0's merged result equals the single-process one. On
GPUs each process takes its own, checked in a faked world of two."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def kill_torchrun(process: subprocess.Popen) -> None:
    """SIGKILL a torchrun and its workers, as a crash or a preempted job would end them. torchrun starts every
    worker in a session of its own, so killing torchrun's process group alone would leave them training."""
    workers = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == process.pid:
                workers.append(int(entry.name))
        except OSError:  # a process that ended meanwhile
            continue
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_each_process_takes_its_own_gpu(monkeypatch):
    """A faked world of two GPUs, seen from the process of local rank 1: --device auto and a bare --device cuda
    both mean cuda:1, and joining the group takes cuda:1 before nccl starts (else every process's model, cache and
    collectives land on GPU 0)."""
    from self_speculation import distributed, loading

    calls = []
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: None)  # resolve_device's probe of the device
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(("join", backend)))
    assert loading.resolve_device("auto") == loading.resolve_device("cuda") == torch.device("cuda", 1)
    assert loading.resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is the user's
    distributed.setup()
    assert calls == [("set_device", 1), ("join", "cpu:gloo,cuda:nccl")]


def launch(nproc: int, script: str, args: list[str]) -> None:
    """Run a script under torchrun with `nproc` processes; one process runs in this one (the reference the
    processes are compared with: a process of its own would only add seconds of start-up)."""
    if nproc == 1:
        import importlib

        from arguments import run

        assert run(importlib.import_module(Path(script).stem).main, args) == 0
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + nproc), script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def test_correctness_and_benchmark_merge_across_two_processes(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def f(x):", "import os", "class A:",
                                                                            "x = [", "while True:"]))
    common = ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", str(prompts), "--max_steps", "12",
              "--sample", "False", "--exit_layer", "3", "--num_speculations", "3",
              "--draft_policy", "static"]  # adaptive drafts follow timings: the acceptance would differ
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        launch(nproc, "correctness.py", common + ["--output_dir", str(out)])
        launch(nproc, "benchmark.py", common + ["--output_dir", str(out), "--generation_strategy",
                                                "autoregressive,self_speculative"])
        [correctness] = out.glob("correctness_*.json")
        [benchmark] = out.glob("benchmark_*.json")
        records = [json.loads(line) for line in benchmark.with_suffix(".jsonl").read_text().splitlines()]
        results[nproc] = (json.loads(correctness.read_text()), json.loads(benchmark.read_text()), records)
    one, two = results[1], results[2]
    assert two[0]["results"] == one[0]["results"] and two[0]["num_prompts"] == 5
    assert two[1]["metrics"].keys() == one[1]["metrics"].keys()
    for name in ("autoregressive", "self_speculative"):
        assert two[1]["metrics"][name]["tokens"] == one[1]["metrics"][name]["tokens"]
    assert two[1]["metrics"]["self_speculative"]["acceptance_rate"] == one[1]["metrics"]["self_speculative"]["acceptance_rate"]

    def tokens(records):
        return sorted((r["strategy"], r["prompt_id"], tuple(r["tokens"])) for r in records)

    assert len(two[2]) == 10 and tokens(two[2]) == tokens(one[2])


def test_two_training_processes_train_as_one(tmp_path, corpus_file):
    """torchrun with 2 processes (gloo, DistributedDataParallel) against one process with the same global batch:
    the same loss at every step and the same weights at the end, up to the order of float additions."""
    import csv

    import torch

    from test_training import TINY

    common = ["--data", str(corpus_file), "--heldout_fraction", "0.3", "--device", "cpu"] + TINY + [
        "--max_steps", "6", "--save_every", "3", "--eval_every", "3", "--p_max", "0.5"]
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        launch(nproc, "train.py", common + ["--output_dir", str(out)])
        curve = [float(r["loss"]) for r in csv.DictReader((out / "training_curve.csv").open())]
        runs[nproc] = curve, torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert len(runs[1][0]) == len(runs[2][0]) == 6
    assert runs[2][0] == pytest.approx(runs[1][0], rel=1e-4)
    difference = max((runs[1][1][k] - runs[2][1][k]).abs().max().item() for k in runs[1][1])
    assert difference < 1e-4, difference


def test_training_under_torchrun_resumes_exactly(tmp_path, corpus_file):
    """Two processes killed after their first checkpoint, then resumed (under torchrun again), end with the weights
    and loss curve of an uninterrupted two-process run."""
    import csv
    import time

    import torch

    from test_training import TINY

    args = ["--data", str(corpus_file), "--heldout_fraction", "0.3", "--device", "cpu"] + TINY + [
        "--max_steps", "40", "--save_every", "2", "--eval_every", "10", "--p_max", "0.5"]
    launch(2, "train.py", args + ["--output_dir", str(tmp_path / "straight")])

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29512",
               "train.py", *args, "--output_dir", str(interrupted)]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (interrupted / "checkpoint.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    kill_torchrun(process)
    stopped_at = torch.load(interrupted / "checkpoint.pt", weights_only=False)["step"]
    assert stopped_at < 40, "the run finished before it could be interrupted"
    launch(2, "train.py", args + ["--output_dir", str(interrupted), "--resume", "True"])

    def final(out):
        curve = [(r["step"], r["loss"]) for r in csv.DictReader((out / "training_curve.csv").open())]
        return curve, torch.load(out / "checkpoint.pt", weights_only=False)["model"]

    (curve_a, weights_a), (curve_b, weights_b) = final(tmp_path / "straight"), final(interrupted)
    assert curve_b == curve_a
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
