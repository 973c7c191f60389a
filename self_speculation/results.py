"""Reading prompt files and writing results: one JSON document per run, JSONL records as they complete."""

import gzip
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError


def ensure_output_dir(path: str) -> Path:
    """Create the directory and prove it is writable before any long work starts."""
    directory = Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise UsageError(f"--output_dir {path} is not writable ({error.strerror or error})") from None
    return directory


def new_run(directory: Path, prefix: str) -> Path:
    """The stem of a new run's result files, `PREFIX_TIME_XXXXXX`: runs started in the same second into one
    directory never share files. Its name is the run id that every record of the run carries."""
    while True:
        stem = directory / f"{prefix}_{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"
        if not any(directory.glob(stem.name + "*")):
            return stem


def write_json(path: Path, document: dict) -> None:
    """Write atomically, so an interrupted run never leaves half a document."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def read_text(path) -> str:
    """A data file's text (gzip-compressed when it ends in .gz); one that is not UTF-8 raises UsageError naming the
    file and the line of the first undecodable byte."""
    data = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise UsageError(f"{path}: not a gzip file ({error})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UsageError(f"{path} line {line}: not UTF-8 text (byte 0x{data[error.start]:02x})") from None


def jsonl_records(path, text: str, field: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL text, each with a string under `field`; a bad line
    raises UsageError naming the file and the line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path} line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise UsageError(f"{path} line {number}: expected an object with a string field {field!r}")
        yield number, record
