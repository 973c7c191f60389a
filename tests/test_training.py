"""train.py on a tiny configuration: the loss falls, an interrupted run resumes exactly, outputs are complete."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import train
from arguments import run
from self_speculation import training

TINY = ["--num_layers", "4", "--hidden_size", "32", "--intermediate_size", "64", "--num_heads", "2",
        "--num_kv_heads", "1", "--seq_len", "64", "--batch_size", "4", "--vocab_size", "300", "--warmup_steps", "3",
        "--lr", "3e-3", "--eval_every", "4", "--save_every", "4", "--eval_batches", "2", "--rotation", "2"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """A small corpus of real code: a few standard-library modules copied into one JSONL file."""
    from self_speculation.corpus import stdlib_files

    path = tmp_path_factory.mktemp("corpus") / "code.jsonl"
    files = [f for f in stdlib_files() if f.name in {"bisect.py", "heapq.py", "colorsys.py", "fnmatch.py",
                                                     "glob.py", "shlex.py", "textwrap.py", "calendar.py"}]
    path.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files))
    return path


def train_run(tmp_path, corpus_file, *extra):
    argv = ["--output_dir", str(tmp_path), "--data", str(corpus_file), "--heldout_fraction", "0.3"] + TINY
    assert run(train.main, argv + [str(a) for a in extra]) == 0
    return tmp_path


def rows(path):
    return list(csv.DictReader(path.open()))


def test_training_lowers_the_loss_and_writes_everything(tmp_path, corpus_file):
    out = train_run(tmp_path, corpus_file, "--max_steps", "24")
    curve = rows(out / "training_curve.csv")
    assert [int(r["step"]) for r in curve] == list(range(1, 25))
    first, last = sum(float(r["last_layer_loss"]) for r in curve[:4]), sum(float(r["last_layer_loss"]) for r in curve[-4:])
    assert last < first - 0.5
    heldout = rows(out / "heldout_losses.csv")
    assert [int(r["step"]) for r in heldout] == [4, 8, 12, 16, 20, 24]
    assert float(heldout[-1]["layer_4"]) < float(heldout[0]["layer_4"])
    model_dir = out / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "training.json"):
        assert (model_dir / name).exists(), name
    assert all(t.dtype == torch.bfloat16 for t in load_file(model_dir / "model.safetensors").values())
    assert (out / "training_curve.png").stat().st_size > 10_000


def test_interrupted_run_resumes_exactly(tmp_path, corpus_file, monkeypatch):
    straight = train_run(tmp_path / "straight", corpus_file, "--max_steps", "12")

    saves = []
    real_save = training.save_checkpoint

    def crash_after_first_save(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(args[5])
        if len(saves) == 1:
            raise KeyboardInterrupt  # as if the run had been stopped right after step 4

    monkeypatch.setattr(training, "save_checkpoint", crash_after_first_save)
    interrupted = tmp_path / "interrupted"
    argv = ["--output_dir", str(interrupted), "--data", str(corpus_file), "--heldout_fraction", "0.3",
            "--max_steps", "12"] + TINY
    assert run(train.main, argv) == 130
    assert run(train.main, argv) == 2  # the checkpoint is not overwritten without --resume
    assert run(train.main, argv + ["--resume"]) == 0
    assert saves[0] == 4

    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(interrupted / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in rows(interrupted / "training_curve.csv")] == [str(s) for s in range(1, 13)]
    assert [r["loss"] for r in rows(interrupted / "training_curve.csv")] == \
        [r["loss"] for r in rows(straight / "training_curve.csv")]
    assert len(rows(interrupted / "heldout_losses.csv")) == 3


def test_resume_refuses_other_flags(tmp_path, corpus_file, capsys):
    train_run(tmp_path, corpus_file, "--max_steps", "4")
    argv = ["--output_dir", str(tmp_path), "--data", str(corpus_file), "--heldout_fraction", "0.3",
            "--max_steps", "4", "--resume", "--lr", "1e-3"] + TINY[:-6]
    assert run(train.main, argv) == 2
    assert "flags differ" in capsys.readouterr().err


def test_bad_training_flags(capsys, tmp_path):
    assert run(train.main, ["--output_dir", str(tmp_path), "--p_max", "1.5"]) == 2
    assert "--p_max" in capsys.readouterr().err
    assert run(train.main, ["--output_dir", str(tmp_path), "--data", str(tmp_path / "none*.py")]) == 2
    assert "no such file" in capsys.readouterr().err
