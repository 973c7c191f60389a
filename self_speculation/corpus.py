"""Training text: the Python standard library's own source (a code corpus on every machine), text files, globs or
JSONL; a byte-level BPE tokenizer trained on it; packing into fixed-length sequences; a held-out split."""

import glob
import hashlib
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .errors import UsageError
from .results import jsonl_records

TEST_DIRECTORIES = {"test", "tests", "idle_test"}
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every .py file of the standard library, tests and installed packages excluded, in a stable order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or TEST_DIRECTORIES & set(parts[:-1]) or path.name.startswith("test_"):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_name(path: Path) -> str:
    """A standard-library file's name in the corpus: its path relative to the standard library, the same on every
    machine."""
    return path.relative_to(sysconfig.get_paths()["stdlib"]).as_posix()


def file_list_hash(names: Iterable[str]) -> str:
    """A short fingerprint of which files make up a corpus (their corpus names, in order)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def expand_sources(sources: Iterable[str]) -> list[tuple[str, Path]]:
    """(name, path) of every file of `stdlib`, file paths, directories (every file below) and glob patterns, in a
    stable order. A file is named relative to the standard library, or to the parent of the directory given, or by
    its file name: never by where the data lies, so the held-out split and the fingerprint are the same on every
    machine."""
    files: list[tuple[str, Path]] = []
    for source in sources:
        if source == "stdlib":
            files += [(stdlib_name(p), p) for p in stdlib_files()]
            continue
        matches = sorted(Path(m) for m in glob.glob(source, recursive=True))
        if not matches:
            raise UsageError(f"--data {source}: no such file, directory or matching files")
        for match in matches:
            if match.is_dir():
                below = sorted(p for p in match.rglob("*") if p.is_file())
                files += [(p.relative_to(match.parent).as_posix(), p) for p in below]
            else:
                files.append((match.name, match))
    return files


def read_documents(files: Iterable[tuple[str, Path]], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(name, text) of every document: one per plain-text file (named as the file), one per line of a .jsonl
    file (named `file:line`)."""
    for name, path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary or foreign-encoded files are not text to learn from
        if path.suffix != ".jsonl":
            if text.strip():
                yield name, text
            continue
        for number, record in jsonl_records(path, text, text_field):
            yield f"{name}:{number}", record[text_field]


def is_held_out(name: str, fraction: float) -> bool:
    """A deterministic split by document name, the same on every machine; adding documents never moves others
    between the splits."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with <s>, </s> and <pad>; every text round-trips through it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def pack(documents: Iterable[list[int]], length: int, separator: int) -> list[list[int]]:
    """Concatenate token lists, each followed by `separator`, and cut them into sequences of exactly `length`
    tokens (the incomplete tail is dropped)."""
    sequences, buffer = [], []
    for tokens in documents:
        buffer += tokens + [separator]
        while len(buffer) >= length:
            sequences.append(buffer[:length])
            buffer = buffer[length:]
    return sequences
