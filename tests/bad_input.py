"""What every bad-input case checks: exit status 2, one `error:` line holding the expected words, no traceback,
nothing written to the output directory. Shared by the bad-input tables (test_bad_input.py and those beside it)."""

from pathlib import Path

import benchmark
import correctness
import eval as eval_script
import exits
import generate
import sweep
import train
from arguments import run

SCRIPTS = {"generate": generate, "benchmark": benchmark, "correctness": correctness, "eval": eval_script,
           "sweep": sweep, "train": train, "exits": exits}


def case_id(case) -> str:
    script, argv, _ = case
    return f"{script} " + " ".join(a for a in argv if a not in ("--model", "{model}"))[:60]


def assert_refused(script: str, argv: list[str], fragments: list[str], files: dict, capsys, monkeypatch) -> str:
    """Run `script` with `argv` (placeholders filled from `files`) offline and check that it is refused in one
    line holding every fragment; returns that line."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # offline, as here; restored after the case
        monkeypatch.setenv(variable, "1")
    argv = [a.format(**files) for a in argv]
    if script not in ("train", "exits") and "--output_dir" not in argv:
        argv += ["--output_dir", files["out"]]
    if script == "exits":
        argv += ["--output_dir", files["out"]]
    code = run(SCRIPTS[script].main, argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    assert len(lines[-1]) <= 300, f"an error a user reads at a glance, not {len(lines[-1])} characters: {lines[-1]}"
    assert not any(Path(files["out"]).iterdir()), "a rejected command wrote to the output directory"
    return lines[-1]
