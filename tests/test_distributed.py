"""Two CPU processes under torchrun split the examples; rank 0's merged result equals the single-process one."""

import json
import os
import subprocess
import sys

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(nproc: int, script: str, args: list[str]):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + nproc), script] if nproc > 1 else [sys.executable, script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_correctness_and_benchmark_merge_across_two_processes(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def f(x):", "import os", "class A:",
                                                                            "x = [", "while True:"]))
    common = ["--model", str(checkpoint), "--dataset", "custom_jsonl", "--data_path", str(prompts), "--max_steps", "12",
              "--sample", "False", "--exit_layer", "3", "--num_speculations", "3"]
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


def test_two_training_processes_train_as_one(tmp_path):
    """torchrun with 2 processes (gloo, DistributedDataParallel) against one process with the same global batch:
    the same loss at every step and the same weights at the end, up to the order of float additions."""
    import csv

    import torch

    from test_training import TINY
    from self_speculation.corpus import stdlib_files

    corpus = tmp_path / "code.jsonl"
    files = [f for f in stdlib_files() if f.name in {"bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "glob.py",
                                                     "shlex.py", "textwrap.py", "calendar.py"}]
    corpus.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files))
    common = ["--data", str(corpus), "--heldout_fraction", "0.3", "--device", "cpu"] + TINY + [
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
