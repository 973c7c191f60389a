"""--help tells the truth: every script opens with what it does and an example command, every flag has help text,
and no --no_X flag carries --X's text (which then reads as its opposite)."""

import argparse
import importlib
from pathlib import Path

import pytest

SCRIPTS = ["generate", "benchmark", "eval", "sweep", "correctness", "exits", "train"]


def help_of(name: str, monkeypatch, capsys) -> tuple[argparse.ArgumentParser, str]:
    """The script's parser, as its main builds it, and what --help prints."""
    seen = []
    real = argparse.ArgumentParser.print_help
    monkeypatch.setattr(argparse.ArgumentParser, "print_help",
                        lambda parser, file=None: seen.append(parser) or real(parser, file))
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(name).main(["--help"])
    assert stop.value.code == 0
    return seen[0], capsys.readouterr().out


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_opens_with_a_sentence_and_an_example(name, monkeypatch, capsys):
    _, text = help_of(name, monkeypatch, capsys)
    description = text.split("\n\n", 2)[1]  # after the usage lines
    assert description.endswith(".") and not description.startswith("python"), description
    assert f"example:\n  python {name}.py" in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help_and_no_negative_flag_reads_as_its_opposite(name, monkeypatch, capsys):
    parser, _ = help_of(name, monkeypatch, capsys)
    for action in parser._actions:
        flag = action.option_strings[0]
        assert action.help and action.help.strip(), f"{name}.py {flag} has no help"
        if flag.startswith("--no_") and f"--{flag[5:]}" in parser._option_string_actions:
            positive = parser._option_string_actions[f"--{flag[5:]}"]
            assert action.help == f"the same as --{flag[5:]} False" and action.help != positive.help, flag
    assert str(Path(__file__).resolve().parents[1]) not in parser.format_help()  # no machine's own path shown


def test_defaults_shown_are_the_ones_that_apply(monkeypatch, capsys):
    """correctness.py decodes greedily whatever --sample says, and eval.py's generation tasks bring their own
    settings: neither shows a default that does not apply."""
    parser, _ = help_of("correctness", monkeypatch, capsys)
    for flag in ("--sample", "--temperature", "--top_k", "--top_p", "--generation_strategy"):
        text = parser._option_string_actions[flag].help
        assert text.startswith("not used") and "(default: " in text, flag  # the formatter adds no other default
    parser, _ = help_of("eval", monkeypatch, capsys)
    for flag in ("--max_steps", "--sample", "--temperature", "--top_k", "--top_p", "--no_repeat_ngram_size"):
        assert "(default: the task's" in parser._option_string_actions[flag].help, flag
