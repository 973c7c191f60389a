"""train.py on a tiny configuration: the loss falls, an interrupted run resumes exactly, outputs are complete."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import train
from arguments import run
from training import trainer as training

TINY = ["--num_layers", "4", "--hidden_size", "32", "--intermediate_size", "64", "--num_heads", "2",
        "--num_kv_heads", "1", "--seq_len", "64", "--batch_size", "4", "--vocab_size", "300", "--warmup_steps", "3",
        "--lr", "3e-3", "--eval_every", "4", "--save_every", "4", "--eval_batches", "2", "--rotation", "2",
        "--recommend", "False"]


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


def test_resume_without_a_checkpoint_is_refused(capsys, tmp_path, corpus_file):
    argv = ["--output_dir", str(tmp_path), "--data", str(corpus_file), "--heldout_fraction", "0.3", "--max_steps", "2",
            "--resume"] + TINY
    assert run(train.main, argv) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "data.pt").exists()  # refused before any work


def test_bad_training_flags(capsys, tmp_path):
    assert run(train.main, ["--output_dir", str(tmp_path), "--p_max", "1.5"]) == 2
    assert "--p_max" in capsys.readouterr().err
    assert run(train.main, ["--output_dir", str(tmp_path), "--data", str(tmp_path / "none*.py")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cached_data_is_rebuilt_when_the_data_or_settings_change(tmp_path, corpus_file):
    """A run stopped before its first checkpoint leaves data.pt behind; a run with other flags in the same
    directory must not train on it."""
    config = training.TrainConfig(output_dir=str(tmp_path), data=[str(corpus_file)], heldout_fraction=0.3,
                                  seq_len=64, batch_size=4, vocab_size=300)
    training.prepare_data(config, tmp_path)
    assert torch.load(tmp_path / "data.pt")["train"].shape[1] == 64
    other = tmp_path / "other.jsonl"
    other.write_text(corpus_file.read_text().replace("def ", "async def "))
    argv = ["--output_dir", str(tmp_path), "--data", str(other), "--heldout_fraction", "0.3", "--max_steps", "1"]
    assert run(train.main, argv + TINY[:10] + ["--seq_len", "32"] + TINY[12:]) == 0
    saved = torch.load(tmp_path / "data.pt")
    assert saved["train"].shape[1] == 32 and saved["key"]["data"] == [str(other)]
    assert saved["key"]["content_sha256_16"] != training.data_key(config, [])["content_sha256_16"]


def test_resume_refuses_data_that_changed_since_the_checkpoint(tmp_path, corpus_file, capsys):
    data = tmp_path / "code.jsonl"
    data.write_text(corpus_file.read_text())
    argv = ["--output_dir", str(tmp_path / "run"), "--data", str(data), "--heldout_fraction", "0.3",
            "--max_steps", "4"] + TINY
    assert run(train.main, argv) == 0
    data.write_text(corpus_file.read_text().replace("return", "return  "))
    assert run(train.main, argv + ["--resume"]) == 2
    assert "content_sha256_16 changed" in capsys.readouterr().err


def test_self_distillation_trains_and_logs_agreement(tmp_path, corpus_file):
    out = train_run(tmp_path, corpus_file, "--max_steps", "8", "--distill_weight", "0.5", "--distill_temperature", "2",
                    "--exit_weighting", "uniform")
    agreement = rows(out / "heldout_agreement.csv")
    assert [int(r["step"]) for r in agreement] == [4, 8]
    assert all(0 <= float(r[f"layer_{i}"]) <= 1 for r in agreement for i in range(1, 4))
    assert all(float(r["layer_4"]) == 1 for r in agreement)
    recipe = json.loads((out / "model" / "training.json").read_text())["recipe"]
    assert recipe["distill_weight"] == 0.5 and recipe["exit_weighting"] == "uniform"


def test_continued_training_records_the_checkpoints_shape_not_the_from_scratch_flags(tmp_path, corpus_file):
    first = train_run(tmp_path / "first", corpus_file, "--max_steps", "2")
    second = train_run(tmp_path / "second", corpus_file, "--max_steps", "2", "--init_from", first / "model",
                       "--num_layers", "7")
    facts = json.loads((second / "model" / "training.json").read_text())
    assert facts["model_shape"]["num_hidden_layers"] == 4 and facts["model_shape"]["hidden_size"] == 32


@pytest.mark.parametrize("flag, value", [("--distill_weight", "1.5"), ("--distill_temperature", "0"),
                                         ("--exit_weighting", "shallow")])
def test_bad_distillation_flags(capsys, tmp_path, flag, value):
    assert run(train.main, ["--output_dir", str(tmp_path), flag, value]) == 2
    assert flag in capsys.readouterr().err


def test_continual_pretraining_keeps_the_checkpoints_tokenizer(tmp_path, corpus_file, checkpoint):
    """--init_from a Hugging Face Llama with its own tokenizer (a byte-level one here): no BPE is trained, the saved
    model has the checkpoint's tokenizer and shape, and the toolkit loads and runs it."""
    from transformers import AutoTokenizer

    from self_speculation import GenerationConfig, Generator
    from self_speculation.loading import load

    out = train_run(tmp_path, corpus_file, "--max_steps", "2", "--init_from", checkpoint, "--recommend", "True")
    original, saved = AutoTokenizer.from_pretrained(checkpoint), AutoTokenizer.from_pretrained(out / "model")
    assert saved.get_vocab() == original.get_vocab() and len(saved) == 258
    model, tokenizer = load(str(out / "model"))
    assert model.config.num_hidden_layers == 6
    recommended = model.config.layerskip  # written by --recommend: what self_speculative then uses by default
    assert 1 <= recommended["exit_layer"] < 6 and 1 <= recommended["num_speculations"] <= 8
    result = Generator(model, tokenizer, GenerationConfig(sample=False, max_steps=4)).generate("def f(x):")
    assert len(result.tokens) == 4


def test_float16_mixed_precision_trains_with_a_gradient_scaler(tmp_path, corpus_file):
    out = train_run(tmp_path, corpus_file, "--max_steps", "4", "--dtype", "float16", "--device", "cpu")
    curve = rows(out / "training_curve.csv")
    assert len(curve) == 4 and all(float(r["loss"]) < 10 for r in curve)
    scaler = torch.load(out / "checkpoint.pt", weights_only=False)["scaler"]
    assert scaler["scale"] > 0  # saved, so that --resume continues with the same loss scale
