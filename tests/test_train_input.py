"""train.py's bad input as a table (the format of test_bad_input.py, checked by bad_input.assert_refused: exit
status 2, one `error:` line holding the fragments, nothing written to {out}), every numeric flag against nan, inf,
negatives, zero and huge values, and the faults of a long run: a loss that turns non-finite, an update that breaks
the weights, a full disk and a torn data cache.

Placeholders beyond those of the `files` fixture (see test_bad_input.py): {code} a small corpus of real code (the
`corpus_file` fixture), {gpt2} a GPT-2 checkpoint (not the Llama layout), {no_eos} a Llama whose tokenizer has no
eos token. Every case runs on SMALL, a configuration that trains in seconds, so that a flag which is not refused
shows as a finished run rather than an hour of training.
"""

import errno
import math
from dataclasses import fields

import pytest
import torch

import train
from arguments import parse, run
from bad_input import assert_refused
from models import byte_tokenizer, save_tiny_checkpoint
from training import trainer as training
from self_speculation.errors import UsageError
from training import TrainConfig

SMALL = ["--output_dir", "{out}", "--data", "{code}", "--heldout_fraction", "0.3", "--max_steps", "2",
         "--num_layers", "2", "--hidden_size", "32", "--intermediate_size", "64", "--num_heads", "2",
         "--num_kv_heads", "1", "--seq_len", "32", "--batch_size", "2", "--vocab_size", "300", "--eval_every", "2",
         "--save_every", "2", "--eval_batches", "1", "--recommend", "False"]

CASES = [
    # numbers that ruin a run: refused before anything is read or written (a later flag wins over SMALL's)
    ("train", SMALL + ["--lr", "inf"], ["--lr", "finite"]),
    ("train", SMALL + ["--lr", "nan"], ["--lr", "(got nan)"]),
    ("train", SMALL + ["--lr", "20"], ["--lr", "--weight_decay", "< 1"]),  # AdamW scales weights by 1 - lr·wd
    ("train", SMALL + ["--weight_decay", "-1"], ["--weight_decay", ">= 0"]),
    ("train", SMALL + ["--weight_decay", "nan"], ["--weight_decay"]),
    ("train", SMALL + ["--min_lr_ratio", "-5"], ["--min_lr_ratio", "[0, 1]"]),
    ("train", SMALL + ["--min_lr_ratio", "1.5"], ["--min_lr_ratio", "[0, 1]"]),
    ("train", SMALL + ["--warmup_steps", "-1"], ["--warmup_steps", ">= 0"]),
    ("train", SMALL + ["--grad_clip", "-1"], ["--grad_clip", ">= 0"]),
    ("train", SMALL + ["--grad_clip", "nan"], ["--grad_clip"]),
    ("train", SMALL + ["--e_scale", "nan"], ["--e_scale", "(got nan)"]),
    ("train", SMALL + ["--e_scale", "inf"], ["--e_scale", "finite"]),
    ("train", SMALL + ["--e_scale", "1e300"], ["--e_scale", "[0, "]),
    ("train", SMALL + ["--distill_temperature", "1e300"], ["--distill_temperature", "(0, "]),
    ("train", SMALL + ["--seq_len", "1"], ["--seq_len", ">= 2"]),
    ("train", SMALL + ["--vocab_size", "1"], ["--vocab_size", "[259, "]),
    ("train", SMALL + ["--num_layers", "1"], ["--num_layers", ">= 2"]),
    ("train", SMALL + ["--vocab_size", str(10**30)], ["--vocab_size", "[259, "]),  # token ids are packed as int32
    ("train", SMALL + ["--rotation", str(10**30)], ["--rotation", "[1, "]),  # the curriculum's int64 modulus
    # a shape that cannot work: rotary embeddings need an even head dimension
    ("train", SMALL + ["--hidden_size", "6", "--num_heads", "2"], ["--hidden_size", "--num_heads", "head dimension of 3",
                                                                   "even"]),
    # checked before any work: the data's size, and the checkpoint to start from
    ("train", ["--output_dir", "{out}", "--data", "{corpus}"], ["--data", "too little text", "--seq_len 512"]),
    ("train", SMALL + ["--init_from", "{gpt2}"], ["--init_from", "GPT2LMHeadModel", "Llama decoder layout"]),
    ("train", SMALL + ["--init_from", "{no_eos}"], ["--init_from", "no eos token"]),
    ("train", SMALL + ["--init_from", "{no_tokenizer}"], ["--init_from", "no tokenizer"]),
    # a checkpoint whose config disagrees with its weights would train the missing layers from noise
    ("train", SMALL + ["--init_from", "{more_layers}"], ["--init_from", "do not match its config.json", "18 missing"]),
    # sharding needs the processes torchrun starts, and nccl needs GPUs
    ("train", SMALL + ["--fsdp", "True"], ["--fsdp True", "torchrun", "1 process", "drop --fsdp"]),
    ("train", SMALL + ["--backend", "nccl", "--device", "cpu"], ["--backend nccl", "--device cpu", "gloo"]),
]


@pytest.fixture(scope="module")
def start_checkpoints(tmp_path_factory):
    """A GPT-2 and a Llama without an eos token, each saved with a byte-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=258, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    no_eos = tmp_path_factory.mktemp("no_eos")
    save_tiny_checkpoint(no_eos)
    tokenizer = byte_tokenizer()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(no_eos)
    return {"gpt2": str(gpt2), "no_eos": str(no_eos)}


@pytest.fixture
def train_files(files, start_checkpoints, corpus_file):
    return files | start_checkpoints | {"code": str(corpus_file)}


def case_id(case) -> str:
    _, argv, _ = case
    return " ".join(argv[len(SMALL):] if argv[: len(SMALL)] == SMALL else argv)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_bad_training_input_gets_one_line(case, train_files, capsys, monkeypatch):
    assert_refused(*case, train_files, capsys, monkeypatch)


@pytest.fixture
def two_processes(monkeypatch):
    """The environment torchrun gives the first of two processes, without a rendezvous address: a command that
    got past the checks would fail at once joining the group, not wait for a second process."""
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)


LAUNCH_CASES = [
    ("train", SMALL + ["--fsdp", "True", "--batch_size", "3"], ["--batch_size 3", "multiple of the 2 processes"]),
    ("train", SMALL + ["--batch_size", "3"], ["--batch_size 3", "multiple of the 2 processes"]),  # replicas too
    ("train", SMALL + ["--fsdp", "True", "--device", "cpu", "--backend", "nccl"], ["--backend nccl", "--device cpu"]),
]


@pytest.mark.parametrize("case", LAUNCH_CASES, ids=[case_id(c) for c in LAUNCH_CASES])
def test_bad_input_under_torchrun_gets_one_line(case, two_processes, train_files, capsys, monkeypatch):
    assert_refused(*case, train_files, capsys, monkeypatch)


def test_only_the_first_process_says_why(two_processes, train_files, capsys, monkeypatch):
    """Every process refuses the same command before they meet; the others exit as the first does, silently, so a
    torchrun of N processes prints the error once."""
    monkeypatch.setenv("RANK", "1")
    argv = [a.format(**train_files) for a in SMALL + ["--fsdp", "True", "--batch_size", "3"]]
    assert run(train.main, argv) == 2
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device auto is a GPU here")
def test_nccl_is_refused_where_training_runs_on_the_cpu(train_files, capsys, monkeypatch):
    assert_refused("train", SMALL + ["--backend", "nccl"], ["--backend nccl", "on cpu", "gloo"], train_files, capsys,
                   monkeypatch)


NUMERIC = [f.name for f in fields(TrainConfig) if f.type in (int, float)]
ODD_VALUES = ["nan", "inf", "-inf", "-1", "-1e-9", "0", "1e300", "1e400", str(10**30)]


@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_flag_is_accepted_or_refused_by_name(name, tmp_path):
    """What a property test over the flags asks: a value is accepted, or refused in a UsageError naming its flag;
    a float flag never accepts nan or an infinity."""
    for value in ODD_VALUES:
        try:
            (config,) = parse((TrainConfig,), ["--output_dir", str(tmp_path), f"--{name}", value])
        except UsageError as error:
            assert f"--{name}" in str(error), (value, error)
            continue
        accepted = getattr(config, name)
        assert math.isfinite(accepted), (value, accepted)


def test_every_numeric_field_has_its_range():
    """A numeric field added to TrainConfig gets its bounds in training.RANGES (--seed has its own check)."""
    assert set(NUMERIC) == set(training.RANGES) | {"seed"}


def small_argv(out, corpus_file, *extra) -> list[str]:
    filled = {"out": str(out), "code": str(corpus_file)}
    return [a.format(**filled) for a in SMALL] + ["--max_steps", "8", "--save_every", "4", "--eval_every", "4",
                                                  *map(str, extra)]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, corpus_file, capsys,
                                                                        monkeypatch):
    real_forward, calls = training.recipe_forward, []

    def nan_from_step_6(model, ids, rates, weights, *args, **kwargs):
        result = real_forward(model, ids, rates, weights, *args, **kwargs)
        if weights is not None:  # a training step (one micro-batch each), not an evaluation
            calls.append(1)
            if len(calls) >= 6:
                result.loss = result.loss * math.nan
        return result

    monkeypatch.setattr(training, "recipe_forward", nan_from_step_6)
    out = tmp_path / "run"
    assert run(train.main, small_argv(out, corpus_file)) == 2
    line = one_error_line(capsys)
    assert "step 6" in line and "loss is nan" in line and "step 4" in line, line
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 4
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert not (out / "model").exists()
    assert [r.split(",")[0] for r in (out / "training_curve.csv").read_text().split()[1:]] == ["1", "2", "3", "4", "5"]


def test_an_update_that_breaks_the_weights_saves_no_checkpoint(tmp_path, corpus_file, capsys, monkeypatch):
    """A finite loss whose update leaves a nan weight (a gradient overflow) is caught when the weights are saved."""
    real_step, steps = torch.optim.AdamW.step, []

    def step_breaking_the_weights_at_4(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 4:  # the first step that saves a checkpoint
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.nan
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_breaking_the_weights_at_4)
    out = tmp_path / "run"
    assert run(train.main, small_argv(out, corpus_file)) == 2
    line = one_error_line(capsys)
    assert "step 4" in line and "not finite" in line and "no checkpoint" in line, line
    assert not (out / "checkpoint.pt").exists() and not (out / "model").exists()


def test_a_diverging_learning_rate_stops_the_run_at_the_step(tmp_path, corpus_file, capsys):
    """No fault injected: --lr 1e30 without weight decay passes every range check, and the weights it makes stop
    the run, named by its step, before any checkpoint or model is saved."""
    out = tmp_path / "run"
    assert run(train.main, small_argv(out, corpus_file, "--lr", "1e30", "--weight_decay", "0")) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: step ") and ("not finite" in line or "loss is" in line), line
    assert "no checkpoint had been saved" in line, line
    assert not (out / "checkpoint.pt").exists() and not (out / "model").exists()


def failing_torch_save(monkeypatch, fail_on):
    """torch.save that raises ENOSPC on its calls numbered in `fail_on` (from 1), as on a full disk, after writing
    part of the file."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) in fail_on:
            if hasattr(f, "write"):
                f.write(b"PK\x03\x04 half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_writing_the_data_cache_leaves_nothing_that_blocks_a_rerun(tmp_path, corpus_file, capsys,
                                                                            monkeypatch):
    out = tmp_path / "run"
    failing_torch_save(monkeypatch, fail_on={1})  # the first save is data.pt
    assert run(train.main, small_argv(out, corpus_file)) == 2
    line = one_error_line(capsys)
    assert "data.pt" in line and "No space left on device" in line and "no checkpoint" in line, line
    assert not (out / "data.pt").exists() and not list(out.glob("*.tmp"))
    monkeypatch.undo()
    assert run(train.main, small_argv(out, corpus_file)) == 0


def test_a_full_disk_at_a_checkpoint_keeps_the_one_before(tmp_path, corpus_file, capsys, monkeypatch):
    out = tmp_path / "run"
    failing_torch_save(monkeypatch, fail_on={3})  # data.pt, the checkpoint of step 4, then that of step 8
    assert run(train.main, small_argv(out, corpus_file)) == 2
    line = one_error_line(capsys)
    assert "checkpoint.pt" in line and "No space left on device" in line and "step 4" in line, line
    assert "--resume" in line
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 4
    assert not list(out.glob("*.tmp")) and not (out / "model").exists()
    monkeypatch.undo()
    assert run(train.main, small_argv(out, corpus_file, "--resume", "True")) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 8


def test_a_full_disk_saving_the_model_keeps_the_last_checkpoint(tmp_path, corpus_file, capsys, monkeypatch):
    from transformers import PreTrainedModel

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    assert run(train.main, small_argv(out, corpus_file)) == 2
    line = one_error_line(capsys)
    assert f"{out / 'model'}" in line and "step 8" in line and "--resume" in line, line
    monkeypatch.undo()
    assert run(train.main, small_argv(out, corpus_file, "--resume", "True")) == 0
    assert (out / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("tear", ["truncated", "garbage"])
def test_a_torn_data_cache_is_rebuilt(tmp_path, corpus_file, tear):
    out = tmp_path / "run"
    (config,) = parse((TrainConfig,), small_argv(out, corpus_file))
    out.mkdir()
    training.prepare_data(config, out)
    cached = out / "data.pt"
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2] if tear == "truncated" else b"not a cache")
    assert run(train.main, small_argv(out, corpus_file)) == 0
    assert torch.load(cached)["train"].shape[1] == 32


def test_a_log_row_cut_short_is_dropped_on_resume(tmp_path):
    """A run killed while appending row 10 left its first character; resuming from step 8 keeps rows 1 to 8."""
    path = tmp_path / "heldout_losses.csv"
    path.write_text("step,tokens,layer_1\n" + "".join(f"{s},{64 * s},1.5\n" for s in range(1, 10)) + "1")
    log = training.CsvLog(path, ["step", "tokens", "layer_1"])
    log.truncate_after(8)
    assert [row.split(",")[0] for row in path.read_text().split()] == ["step"] + [str(s) for s in range(1, 9)]


def test_a_log_left_by_a_run_of_another_shape_starts_afresh(tmp_path):
    """A run stopped before its first checkpoint, then started again with another --num_layers."""
    path = tmp_path / "heldout_losses.csv"
    path.write_text("step,tokens,layer_1,layer_2\n4,256,1.5,1.2\n")
    log = training.CsvLog(path, ["step", "tokens", "layer_1", "layer_2", "layer_3"])
    log.truncate_after(0)
    log.write([4, 256, 1.5, 1.25, 1.0])
    assert path.read_text().split() == ["step,tokens,layer_1,layer_2,layer_3", "4,256,1.5,1.25,1"]
