import json

import pytest

from models import save_tiny_checkpoint, tiny_llama


@pytest.fixture(scope="session")
def gqa_tied():
    """Grouped-query attention (4 query heads, 2 key/value heads), LM head tied to the embeddings; no EOS."""
    return tiny_llama(gqa=True, tied=True, seed=0, eos_token_id=None)


@pytest.fixture(scope="session")
def mha_untied():
    """Plain multi-head attention, separate LM head."""
    return tiny_llama(gqa=False, tied=False, seed=1, eos_token_id=None)


@pytest.fixture(params=["gqa_tied", "mha_untied"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny model with a byte-level tokenizer on disk, for the scripts."""
    directory = tmp_path_factory.mktemp("tiny_checkpoint")
    save_tiny_checkpoint(directory)
    return directory


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A small corpus of real code: a few standard-library modules copied into one JSONL file."""
    from self_speculation.corpus import stdlib_files

    path = tmp_path_factory.mktemp("corpus") / "code.jsonl"
    files = [f for f in stdlib_files() if f.name in {"bisect.py", "heapq.py", "colorsys.py", "fnmatch.py",
                                                     "glob.py", "shlex.py", "textwrap.py", "calendar.py"}]
    path.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files))
    return path
