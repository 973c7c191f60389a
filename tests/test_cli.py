"""The scripts: bad input gives one line naming the flag and a non-zero exit; good input works end to end."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import correctness
import generate
from arguments import run
from self_speculation import loading, strategies

ROOT = Path(__file__).resolve().parent.parent
SPECULATIVE = ["--generation_strategy", "self_speculative", "--exit_layer", "3", "--num_speculations", "4"]


def call(main, argv, capsys):
    code = run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    """Exit status 2; the error is the last line of stderr (after any model-loading progress bar), no traceback."""
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--generation_strategy", "self_speculative", "--exit_layer", "0", "--num_speculations", "2"],
         ["--exit_layer", ">= 1"]),
        (["--generation_strategy", "self_speculative", "--num_speculations", "2"], ["--exit_layer", ">= 1"]),
        (["--generation_strategy", "self_speculative", "--exit_layer", "6", "--num_speculations", "2"],
         ["--exit_layer", "[1, 5]"]),
        (["--generation_strategy", "self_speculative", "--exit_layer", "2", "--num_speculations", "0"],
         ["--num_speculations", ">= 1"]),
        (["--exit_layer", "7"], ["--exit_layer", "[1, 6]"]),
        (["--generation_strategy", "medusa"], ["--generation_strategy", "invalid choice", "self_speculative"]),
        (["--streamer", "fancy"], ["--streamer", "invalid choice", "speculative"]),
        (["--temperature", "0"], ["--temperature", "> 0"]),
        (["--top_p", "1.5"], ["--top_p", "(0, 1]"]),
        (["--top_p", "0"], ["--top_p", "(0, 1]"]),
        (["--max_steps", "0"], ["--max_steps", ">= 1"]),
        (["--dtype", "int4"], ["--dtype", "invalid choice"]),
        (["--prompt", "   "], ["prompt is empty"]),
        (["--prompt", "x" * 300], ["301 tokens", "context is 256 tokens"]),
    ],
    ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else None,
)
def test_generate_bad_input(checkpoint, capsys, argv, fragments):
    code, _, err = call(generate.main, ["--model", checkpoint, "--prompt", "hi"] + argv, capsys)
    assert_one_line_error(code, err, *fragments)


def test_sampling_flags_are_not_checked_when_greedy(checkpoint, capsys):
    code, out, _ = call(generate.main, ["--model", checkpoint, "--prompt", "hi", "--sample", "False",
                                        "--temperature", "0", "--max_steps", "5"], capsys)
    assert code == 0 and "| 5 tokens |" in out


def test_missing_model_directory(capsys, tmp_path):
    code, _, err = call(generate.main, ["--model", tmp_path / "nowhere", "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, "--model", "does not exist")


def test_directory_that_is_not_a_model(capsys, tmp_path):
    code, _, err = call(generate.main, ["--model", tmp_path, "--prompt", "hi"], capsys)
    assert_one_line_error(code, err, f"--model {tmp_path}", "no config.json")


def test_without_model_flag_the_embedded_model_runs_with_its_recommendation(capsys):
    from arguments import ModelArguments
    from self_speculation.loading import DEFAULT_MODEL

    assert Path(ModelArguments().model) == DEFAULT_MODEL
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert 1 <= config["layerskip"]["exit_layer"] < config["num_hidden_layers"]
    assert config["layerskip"]["num_speculations"] >= 1
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size <= 30_000_000
    code, out, _ = call(generate.main, ["--prompt", "def add(a, b):", "--sample", "False", "--max_steps", "16",
                                        "--generation_strategy", "self_speculative"], capsys)
    assert code == 0 and "acceptance" in out


def test_unreachable_hub_says_to_pass_a_local_path(capsys, monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    code, _, err = call(generate.main, ["--model", "facebook/layerskip-llama3.2-1B", "--prompt", "hi"], capsys)
    assert time.perf_counter() - start < 10
    assert_one_line_error(code, err, "facebook/layerskip-llama3.2-1B", "unreachable", "local directory")


def test_hub_probe_is_bounded_even_when_name_resolution_hangs(monkeypatch):
    import threading

    released = threading.Event()

    def hang(*args, **kwargs):  # until the test ends, then as an unreachable host fails
        released.wait(30)
        raise OSError("unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading.socket, "create_connection", hang)
    start = time.perf_counter()
    try:
        assert loading.hub_reachable(timeout=0.5) is False
        assert time.perf_counter() - start < 2
    finally:  # the probe's thread ends here, not in a later test (where it raised, as an unhandled thread error)
        released.set()


def test_unavailable_device(checkpoint, capsys):
    if loading.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = call(generate.main, ["--model", checkpoint, "--prompt", "hi", "--device", "cuda"], capsys)
    assert_one_line_error(code, err, "--device cuda", "CUDA is not available")


@pytest.mark.parametrize("streamer", ["none", "standard", "speculative"])
def test_generate_one_prompt(checkpoint, capsys, streamer):
    code, out, _ = call(generate.main, ["--model", checkpoint, "--prompt", "def f(x):", "--streamer", streamer,
                                        "--max_steps", "12", "--sample", "False"] + SPECULATIVE, capsys)
    assert code == 0
    stats = out.strip().splitlines()[-1]
    assert "| 12 tokens |" in stats and "tokens/s" in stats and "acceptance" in stats


def test_interactive_loop_survives_an_interrupted_generation(checkpoint, capsys, monkeypatch):
    calls = []
    real_generate = generate.Generator.generate

    def interrupt_first(self, prompt, streamer=None):
        calls.append(prompt)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_generate(self, prompt, streamer)

    monkeypatch.setattr(generate.Generator, "generate", interrupt_first)
    # ctrl-c while typing, two prompts (the second ended by ctrl-d mid-line), then ctrl-d on an empty prompt
    reads = iter([KeyboardInterrupt, "first prompt\n", "second prompt", ""])

    def read(self):
        value = next(reads)
        if value is KeyboardInterrupt:
            raise KeyboardInterrupt
        return value

    monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"read": read})())
    code, out, _ = call(generate.main, ["--model", checkpoint, "--max_steps", "5", "--sample", "False"], capsys)
    assert code == 0
    assert calls == ["first prompt\n", "second prompt"]
    assert "[generation interrupted]" in out and out.count("| 5 tokens |") == 1
    assert out.count(generate.INSTRUCTIONS) == 4
    # the separator begins its own line when the prompt did not end with one
    assert out.count(generate.INSTRUCTIONS + "\n" + "-" * 40) == 1
    assert out.count(generate.INSTRUCTIONS + "\n\n" + "-" * 40) == 1


def test_interactive_prompts_that_cannot_be_generated_from_ask_again(checkpoint, monkeypatch, capsys):
    """A prompt too long for the model, or bytes that are not UTF-8, used to end the session (exit 2 or a
    traceback); now each is named in one line and the next prompt is read."""
    reads = iter(["x" * 300, UnicodeDecodeError("utf-8", b"abc\xff", 3, 4, "invalid start byte"), "def f(x):", ""])

    def read(self):
        value = next(reads)
        if isinstance(value, Exception):
            raise value
        return value

    monkeypatch.setattr(sys, "stdin", type("Stdin", (), {"read": read})())
    code, out, err = call(generate.main, ["--model", checkpoint, "--max_steps", "5", "--sample", "False"], capsys)
    assert code == 0 and out.count("| 5 tokens |") == 1 and out.count(generate.INSTRUCTIONS) == 4
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "301 tokens" in errors[0] and "not UTF-8 text (byte 0xff)" in errors[1], err


def write_prompts(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "lines, fragments",
    [
        (['{"prompt": "a"}', '{"prompt": "b"'], ["line 2", "not valid JSON"]),
        (['{"text": "a"}'], ["line 1", "'prompt'"]),
        (['{"prompt": ""}'], ["line 1", "empty"]),
        ([""], ["no prompts"]),
    ],
)
def test_correctness_bad_prompt_files(checkpoint, capsys, tmp_path, lines, fragments):
    path = write_prompts(tmp_path / "prompts.jsonl", lines)
    code, _, err = call(correctness.main, ["--model", checkpoint, "--dataset", "custom_jsonl", "--data_path", path] + SPECULATIVE, capsys)
    assert_one_line_error(code, err, *fragments)


def test_correctness_missing_prompt_file(checkpoint, capsys, tmp_path):
    code, _, err = call(correctness.main, ["--model", checkpoint, "--dataset", "custom_jsonl", "--data_path",
                                           tmp_path / "no.jsonl"] + SPECULATIVE,
                        capsys)
    assert_one_line_error(code, err, "--data_path", "no such file")


def test_correctness_unwritable_output_dir(checkpoint, capsys, tmp_path):
    path = write_prompts(tmp_path / "prompts.jsonl", ['{"prompt": "a"}'])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = call(correctness.main, ["--model", checkpoint, "--dataset", "custom_jsonl", "--data_path", path, "--output_dir",
                                           blocker / "logs"] + SPECULATIVE, capsys)
    assert_one_line_error(code, err, "--output_dir", "not writable")


PROMPTS = ['{"prompt": "def add(a, b):"}', '{"prompt": "import os\\n"}', '{"prompt": "Once upon a time"}']


def run_correctness(checkpoint, capsys, tmp_path):
    path = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    code, out, err = call(correctness.main, ["--model", checkpoint, "--dataset", "custom_jsonl", "--data_path", path, "--output_dir", tmp_path / "out",
                                             "--max_steps", "24"] + SPECULATIVE, capsys)
    [result] = (tmp_path / "out").glob("correctness_*.json")
    [records] = (tmp_path / "out").glob("correctness_*.jsonl")
    return code, out, json.loads(result.read_text()), [json.loads(line) for line in records.read_text().splitlines()]


def test_correctness_passes(checkpoint, capsys, tmp_path):
    code, out, result, records = run_correctness(checkpoint, capsys, tmp_path)
    assert code == 0 and "0 of 3 outputs differ" in out
    assert result["num_prompts"] == 3 and result["num_mismatches"] == 0 and len(records) == 3
    assert all(r["match"] and r["autoregressive"]["tokens"] == r["self_speculative"]["tokens"] for r in records)
    assert result["arguments"]["generation"]["exit_layer"] == 3


def test_correctness_reports_the_first_differing_token(checkpoint, capsys, tmp_path, monkeypatch):
    real_verify = strategies.SelfSpeculative.verify

    def off_by_one(d, contexts, drafts, logits, noise):
        accepted, final = real_verify(d, contexts, drafts, logits, noise)
        return accepted, (final + 1) % logits.shape[-1]

    monkeypatch.setattr(strategies.SelfSpeculative, "verify", staticmethod(off_by_one))
    code, out, result, records = run_correctness(checkpoint, capsys, tmp_path)
    assert code == 1 and result["num_mismatches"] == 3
    for r in records:
        a, b, i = r["autoregressive"]["tokens"], r["self_speculative"]["tokens"], r["first_mismatch"]
        assert a[:i] == b[:i] and a[i] != b[i]


def script(*argv, env=None):
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_script_bad_input_has_no_traceback(checkpoint):
    done = script("generate.py", "--model", checkpoint, "--prompt", "hi", "--top_p", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: --top_p must be a finite number in (0, 1] (got 2.0)"


def test_script_runs_end_to_end(checkpoint):
    done = script("generate.py", "--model", checkpoint, "--prompt", "def f(x):", "--max_steps", "8", "--sample", "False",
                  *SPECULATIVE)
    assert done.returncode == 0 and "| 8 tokens |" in done.stdout


def test_only_rank_zero_talks(checkpoint):
    done = script("generate.py", "--model", checkpoint, "--prompt", "hi", env={"RANK": "1", "WORLD_SIZE": "2"})
    assert done.returncode == 0 and done.stdout == ""


@pytest.fixture(scope="module")
def recommending_checkpoint(tmp_path_factory):
    """The tiny checkpoint with a recommended exit layer and draft length in its config, as train.py writes them."""
    from models import save_tiny_checkpoint

    directory = tmp_path_factory.mktemp("recommending")
    save_tiny_checkpoint(directory)
    config = json.loads((directory / "config.json").read_text())
    config["layerskip"] = {"exit_layer": 2, "num_speculations": 3}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_self_speculative_takes_the_checkpoints_recommendation(recommending_checkpoint, capsys):
    from self_speculation import GenerationConfig, Generator
    from self_speculation.loading import load

    model, tokenizer = load(str(recommending_checkpoint))
    speculative = GenerationConfig(generation_strategy="self_speculative")
    assert Generator(model, tokenizer, speculative).config.exit_layer == 2
    assert Generator(model, tokenizer, speculative).config.num_speculations == 3
    explicit = GenerationConfig(generation_strategy="self_speculative", exit_layer=4, num_speculations=1)
    assert (Generator(model, tokenizer, explicit).config.exit_layer,
            Generator(model, tokenizer, explicit).config.num_speculations) == (4, 1)
    assert Generator(model, tokenizer, GenerationConfig()).config.exit_layer == -1  # autoregressive: full model
    code, out, _ = call(generate.main, ["--model", recommending_checkpoint, "--prompt", "x = ", "--sample", "False",
                                        "--max_steps", "6", "--generation_strategy", "self_speculative"], capsys)
    assert code == 0 and "acceptance" in out
