"""Training data: the standard-library corpus, sources, tokenizer, packing, held-out split."""

import sysconfig
from pathlib import Path

import pytest

from self_speculation import UsageError
from self_speculation.corpus import (
    expand_sources,
    file_list_hash,
    is_held_out,
    pack,
    read_documents,
    stdlib_files,
    train_tokenizer,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_stdlib_corpus_has_no_tests_and_a_stable_fingerprint():
    files = stdlib_files()
    names = {p.relative_to(STDLIB).as_posix() for p in files}
    assert len(files) > 300 and "os.py" in names and "json/decoder.py" in names
    assert not any("/test/" in f"/{n}" or n.split("/")[-1].startswith("test_") for n in names)
    assert not any("site-packages" in n for n in names)
    named = expand_sources(["stdlib"])
    assert [path for _, path in named] == files and named[0][0] == files[0].relative_to(STDLIB).as_posix()
    names = [name for name, _ in named]
    assert file_list_hash(names) == file_list_hash(name for name, _ in expand_sources(["stdlib"]))
    assert file_list_hash(names[1:]) != file_list_hash(names)


def test_sources_files_directories_globs_and_jsonl(tmp_path):
    (tmp_path / "a.py").write_text("print(1)\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("hello\n")
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    files = expand_sources([str(tmp_path / "*.py"), str(tmp_path / "sub"), str(tmp_path / "c.jsonl")])
    assert [p.name for _, p in files] == ["a.py", "b.txt", "c.jsonl"]
    documents = list(read_documents(files))
    assert documents == [("a.py", "print(1)\n"), ("sub/b.txt", "hello\n"), ("c.jsonl:1", "one"), ("c.jsonl:3", "two")]
    with pytest.raises(UsageError, match="no such file"):
        expand_sources([str(tmp_path / "missing*.py")])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(UsageError, match="bad.jsonl line 2"):
        list(read_documents([("bad.jsonl", tmp_path / "bad.jsonl")]))


def test_names_and_so_the_split_do_not_depend_on_where_the_data_lies(tmp_path):
    """Two copies of the same data in different directories give the same documents with the same names (a run
    in another temporary directory once held out a different part of the data)."""
    copies = []
    for place in ("here", "elsewhere/deeper"):
        data = tmp_path / place / "data"
        (data / "sub").mkdir(parents=True)
        (data / "sub" / "a.py").write_text("x = 1\n")
        (data / "c.jsonl").write_text('{"text": "one"}\n')
        copies.append(list(read_documents(expand_sources([str(data), str(data / "c.jsonl")]))))
    assert copies[0] == copies[1]
    assert [name for name, _ in copies[0]] == ["data/c.jsonl:1", "data/sub/a.py", "c.jsonl:1"]


def test_tokenizer_round_trips_code():
    documents = [p.read_text() for p in stdlib_files()[:40]]
    tokenizer = train_tokenizer(documents, vocab_size=600)
    assert len(tokenizer) == 600
    sample = "def f(x):\n    return {'é': x ** 2}  # ünïcode\n"
    ids = tokenizer(sample).input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) < len(sample.encode())
    assert tokenizer.decode(ids, skip_special_tokens=True) == sample


def test_pack_cuts_the_separated_stream_into_equal_sequences():
    sequences = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], length=4, separator=0)
    assert sequences == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert pack([[1]], length=4, separator=0) == []


def test_held_out_split_is_deterministic_and_about_the_fraction():
    names = [p.relative_to(STDLIB).as_posix() for p in stdlib_files()]
    held = [n for n in names if is_held_out(n, 0.1)]
    assert held == [n for n in names if is_held_out(n, 0.1)]
    assert 0.05 < len(held) / len(names) < 0.15
    assert is_held_out("json/decoder.py", 0.1) == is_held_out("json/decoder.py", 0.1)
