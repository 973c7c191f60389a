"""Reading prompt files and writing results: one JSON document per run, JSONL records as they complete."""

import contextlib
import gzip
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError, check_text


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


def _unwritable(path: Path, error: OSError, kept: str) -> UsageError:
    return UsageError(f"cannot write {path} ({error.strerror or error})" + (f"; {kept}" if kept else ""))


def write_json(path: Path, document: dict, kept: str = "") -> None:
    """Write atomically, so an interrupted run never leaves half a document. A write that fails (a full disk)
    leaves no temporary file and raises UsageError naming the file and, in `kept`, what the run still holds."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _unwritable(path, error, kept) from None


def append_line(path: Path, line: str, kept: str = "") -> None:
    """Append one line whole or not at all: a write that fails part-way (a full disk) is cut back off the file, so
    that no torn line is left to block a rerun, and raises UsageError naming the file and what was kept."""
    data = line.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as error:
        raise _unwritable(path, error, kept) from None
    try:
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):  # os.write may write less than it was given
                written += os.write(fd, data[written:])
        except OSError as error:
            if written:
                with contextlib.suppress(OSError):  # a device such as /dev/full cannot be truncated
                    os.ftruncate(fd, start)
            raise _unwritable(path, error, kept) from None
    finally:
        os.close(fd)


def append_jsonl(path: Path, record: dict, kept: str = "the records before this one are kept") -> None:
    append_line(path, json.dumps(record, default=str) + "\n", kept)


def read_json_object(path: Path, remedy: str) -> dict:
    """A JSON object the toolkit wrote and a user may have edited: refused in one line naming the file, with
    `remedy`, where it is not valid JSON or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"{path}: not readable JSON ({error}); {remedy}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path}: expected a JSON object, found {type(value).__name__}; {remedy}")
    return value


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


def jsonl_records(path, text: str, field: str | None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL text, each with a string under `field` (any object
    when None) and only valid Unicode text; a bad line raises UsageError naming the file and the line. Lines end at
    "\n" alone (JSON Lines), not at every Unicode line break `str.splitlines` splits on (U+2028, U+0085, ...),
    which a JSON string may hold as it is."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path} line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or field is not None and not isinstance(record.get(field), str):
            wanted = f" with a string field {field!r}" if field is not None else ""
            raise UsageError(f"{path} line {number}: expected an object{wanted}")
        check_text(json.dumps(record, ensure_ascii=False), f"{path} line {number}")  # every string in the line
        yield number, record
