"""Loads the task data that lies beside this file (no download), and scores the line task."""

import difflib
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_mc(**kwargs):
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(HERE / "stdlib_mc.jsonl"), split="train")})


def load_line(**kwargs):
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(HERE / "stdlib_line.jsonl"), split="train")})


def next_line(generation: str) -> str:
    """The answer in a generation: everything up to its second newline. A context ends at the end of a line, without
    its newline (a tokenizer merges a newline with the indentation after it, so a context ending in a bare newline
    is text the model never saw); the first newline is the model's, the second ends the line it wrote."""
    return "\n".join(generation.split("\n")[:2])


def process_line(doc: dict, results: list[str]) -> dict:
    answer, target = next_line(results[0]), doc["target"]
    return {
        "exact_match": float(answer == target),
        # characters in common (difflib's ratio, 0 to 1) of the line and the target, indentation aside
        "edit_similarity": difflib.SequenceMatcher(None, answer.strip(), target.strip(), autojunk=False).ratio(),
    }
