"""train.py --fsdp True: two CPU processes (gloo) holding half a model each train as one process does, with layer
dropout and the early-exit loss on; a run killed after a sharded checkpoint resumes exactly, under torchrun again
or in one process; the final model is one ordinary Hugging Face directory.

One module fixture makes every run once (three torchrun launches, two runs in this process); the tests below each
check one thing about them."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import train
from arguments import run
from test_distributed import ROOT, kill_torchrun, launch
from test_training import TINY
from training import sharding
from training import trainer as training
from training.recipe import draw_kept, dropout_rates, ramp_scale

STEPS = 12
# a constant dropout as high as 0.9 for the last layer: in some steps one process's rows all skip a layer that the
# other's run, and in some no sample runs a layer at all (test_the_draws_reach_every_case_of_layer_dropout)
ARGS = ["--heldout_fraction", "0.3", "--device", "cpu"] + TINY + [
    "--max_steps", str(STEPS), "--save_every", "2", "--eval_every", "4", "--p_max", "0.9", "--dropout_ramp", "constant"]
# activation checkpointing recomputes exactly: the 1-process run and the sharded ones use it, the 1-process resume
# does not, and all agree
CHECKPOINTED = ["--activation_checkpointing", "True"]
SHARDED = ["--fsdp", "True"] + CHECKPOINTED


def rows(path):
    return list(csv.DictReader(path.open()))


def losses(out):
    return [float(r["loss"]) for r in rows(out / "training_curve.csv")]


def kill_after_first_checkpoint(args, out):
    """torchrun killed (SIGKILL, every process) as soon as its first sharded checkpoint is whole."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29513",
               "train.py", *args]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while sharding.existing(out / training.SHARDED_CHECKPOINT) is None and time.time() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.02)
    kill_torchrun(process)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_file):
    root = tmp_path_factory.mktemp("fsdp")
    args = ["--data", str(corpus_file)] + ARGS
    made = {name: root / name for name in ("one", "two", "cut", "cut_one")}
    assert run(train.main, args + CHECKPOINTED + ["--output_dir", str(made["one"])]) == 0
    launch(2, "train.py", args + SHARDED + ["--output_dir", str(made["two"])])
    kill_after_first_checkpoint(args + SHARDED + ["--output_dir", str(made["cut"])], made["cut"])
    stopped_at = training.checkpoint_step(training.find_checkpoint(made["cut"]))
    assert stopped_at < STEPS and not (made["cut"] / "model").exists(), "the run finished before it was killed"
    shutil.copytree(made["cut"], made["cut_one"])
    launch(2, "train.py", args + SHARDED + ["--output_dir", str(made["cut"]), "--resume", "True"])
    assert run(train.main, args + ["--output_dir", str(made["cut_one"]), "--resume", "True"]) == 0
    return made


def test_two_sharded_processes_train_as_one(runs):
    """The 1-process loss at every step, the same held-out losses, and the same weights within float rounding."""
    one, two = runs["one"], runs["two"]
    assert len(losses(two)) == STEPS
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    for name in ("heldout_losses.csv", "heldout_agreement.csv"):
        assert [r["step"] for r in rows(two / name)] == ["4", "8", "12"]
        for a, b in zip(rows(one / name), rows(two / name)):
            assert [float(b[k]) for k in a] == pytest.approx([float(a[k]) for k in a], rel=1e-4, abs=1e-4)
    reference = torch.load(one / "checkpoint.pt", weights_only=False)["model"]
    sharded = sharding.read_weights(two / "checkpoint")
    assert sharded.keys() == reference.keys()
    difference = max((reference[k] - sharded[k]).abs().max().item() for k in reference)
    assert difference < 1e-4, difference
    assert not (two / "checkpoint.pt").exists()


def test_each_process_holds_half_of_the_weights_and_optimizer_state(runs):
    whole = json.loads((runs["one"] / "model" / "training.json").read_text())["processes"]
    split = json.loads((runs["two"] / "model" / "training.json").read_text())["processes"]
    assert whole["processes"] == 1 and split == split | {"processes": 2, "fsdp": True}
    for key in ("parameter_bytes_per_process", "optimizer_state_bytes_per_process"):
        (total,), parts = whole[key], split[key]
        assert sum(parts) == total and len(parts) == 2
        assert all(abs(part - total / 2) <= 0.05 * total for part in parts), (key, parts, total)


def test_the_sharded_run_saves_one_model_every_script_loads(runs):
    """The final model: a Hugging Face directory gathered from the shards, the unsharded run's model to bfloat16
    rounding, and it generates. (The recommendation is then measured on it as on any saved model.)"""
    from safetensors.torch import load_file

    from self_speculation import GenerationConfig, Generator
    from self_speculation.loading import load

    a, b = (load_file(runs[name] / "model" / "model.safetensors") for name in ("one", "two"))
    assert a.keys() == b.keys() and all(b[k].dtype == torch.bfloat16 for k in b)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 2e-2
    model, tokenizer = load(str(runs["two"] / "model"))
    result = Generator(model, tokenizer, GenerationConfig(sample=False, max_steps=4)).generate("def f(x):")
    assert len(result.tokens) == 4


def test_a_killed_sharded_run_resumes_exactly_under_torchrun(runs):
    cut, two = runs["cut"], runs["two"]
    assert [r["step"] for r in rows(cut / "training_curve.csv")] == [str(s) for s in range(1, STEPS + 1)]
    assert losses(cut) == losses(two)
    a, b = sharding.read_weights(two / "checkpoint"), sharding.read_weights(cut / "checkpoint")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_process_resumes_a_two_process_checkpoint(runs):
    """The 2-process sharded checkpoint read by one unsharded process (without activation checkpointing): it ends
    as the 1-process run did, and its own checkpoint replaces the sharded one."""
    cut_one, one = runs["cut_one"], runs["one"]
    assert losses(cut_one) == pytest.approx(losses(one), rel=1e-4)
    a = torch.load(one / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(cut_one / "checkpoint.pt", weights_only=False)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert sharding.existing(cut_one / "checkpoint") is None


def test_the_draws_reach_every_case_of_layer_dropout():
    """The runs above are only a test of sharded layer dropout if, in some step, one process's rows all skipped a
    layer that the other's ran, and in some no sample ran a layer: replay the draws."""
    generator = torch.Generator().manual_seed(42 + 1_000_003)  # the training's dropout generator, --seed 42
    one_side, nobody = 0, 0
    for step in range(STEPS):
        kept = draw_kept(dropout_rates(4, 0.9, ramp_scale("constant", step, STEPS)), 4, generator)  # (L, B)
        first, second = kept[:, :2].any(1), kept[:, 2:].any(1)
        one_side += int((first != second).sum())
        nobody += int((~first & ~second).sum())
    assert one_side > 0 and nobody > 0, (one_side, nobody)


def test_evaluation_in_parts_is_the_evaluation_of_the_whole(tmp_path):
    """A sharded model's held-out evaluation, every process on its part of each batch, rows weighted: the parts
    (summed here, as the processes sum them) give one process's numbers, a part without rows included."""
    from models import tiny_llama

    model = tiny_llama(num_layers=3, vocab_size=300).requires_grad_(True)
    step = training._RecipeStep(model)
    config = training.TrainConfig(output_dir=str(tmp_path), batch_size=4, eval_batches=2)
    heldout = torch.randint(0, 300, (5, 16))  # a last batch of one row: the second of two parts has none
    whole = training.evaluate(step, heldout, config, torch.device("cpu"))
    parts = [training.evaluate(step, heldout, config, torch.device("cpu"), 2, part) for part in (0, 1)]
    for i in range(2):
        assert [a + b for a, b in zip(parts[0][i], parts[1][i])] == pytest.approx(whole[i], rel=1e-5)


def test_an_unsharded_checkpoint_loads_by_parameter_name(tmp_path, corpus_file):
    """checkpoint.pt keys the optimizer state by position; a sharded run reads it by name (sharding.by_name):
    loaded that way into a fresh model and optimizer, it is the state that was saved."""
    from transformers import AutoTokenizer

    from arguments import parse

    out = tmp_path / "run"
    argv = ["--data", str(corpus_file), "--output_dir", str(out), "--heldout_fraction", "0.3"] + TINY + [
        "--max_steps", "2"]
    assert run(train.main, argv) == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    (config,) = parse((training.TrainConfig,), argv)
    model = training.build_model(config, AutoTokenizer.from_pretrained(out / "tokenizer"))
    optimizer = training.make_optimizer(model, config)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: training.learning_rate_factor(s, config))  # as train()'s
    sharding.load_whole(model, optimizer, saved["model"], saved["optimizer"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["model"].items())
    loaded = optimizer.state_dict()
    same_types = lambda groups: [g | {"betas": list(g["betas"])} for g in groups]  # noqa: E731 (a tuple comes back a list)
    assert same_types(loaded["param_groups"]) == same_types(saved["optimizer"]["param_groups"])
    assert loaded["state"].keys() == saved["optimizer"]["state"].keys()
    for i, state in saved["optimizer"]["state"].items():
        assert all(torch.equal(loaded["state"][i][k], v) for k, v in state.items())


def test_a_sharded_checkpoint_that_cannot_be_written_keeps_the_one_before(tmp_path, monkeypatch):
    """A full disk while the shards are written: one line naming the checkpoint and the step kept, no half-written
    checkpoint left, and the kept one reads back (here in one process, as a sharded run's would)."""
    import errno

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from models import tiny_llama

    config = training.TrainConfig(output_dir=str(tmp_path), vocab_size=300)
    model = tiny_llama(num_layers=2, vocab_size=300).requires_grad_(True)
    optimizer = training.make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: training.learning_rate_factor(s, config))
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save = lambda step: training.save_sharded_checkpoint(tmp_path, model, optimizer, scheduler,  # noqa: E731
                                                         torch.Generator(), step, 1.0, config, scaler)
    save(4)
    kept = {k: v.clone() for k, v in model.state_dict().items()}

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", no_space)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(training.RunStopped) as stopped:
        save(8)
    message = str(stopped.value)
    assert "checkpoint" in message and "No space left on device" in message and "step 4" in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    monkeypatch.undo()
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # as a crash in the middle of a swap leaves it
    assert training.find_checkpoint(tmp_path) == tmp_path / "checkpoint.old"
    fresh = tiny_llama(num_layers=2, vocab_size=300, seed=7).requires_grad_(True)
    training.restore(tmp_path / "checkpoint.old", {}, fresh, training.make_optimizer(fresh, config), sharded=False)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in kept.items())
