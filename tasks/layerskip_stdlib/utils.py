"""Loads the task data that lies beside this file (no download)."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_mc(**kwargs):
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(HERE / "stdlib_mc.jsonl"), split="train")})


def load_line(**kwargs):
    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(HERE / "stdlib_line.jsonl"), split="train")})
