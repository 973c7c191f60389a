import json
from pathlib import Path

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
    from training.corpus import stdlib_files

    path = tmp_path_factory.mktemp("corpus") / "code.jsonl"
    files = [f for f in stdlib_files() if f.name in {"bisect.py", "heapq.py", "colorsys.py", "fnmatch.py",
                                                     "glob.py", "shlex.py", "textwrap.py", "calendar.py"}]
    path.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files))
    return path


def _variant(checkpoint, directory, config=None, weights=None, files=None):
    """A copy of the tiny checkpoint with config.json entries replaced, weights changed, or files added."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, directory)
    if config:
        path = directory / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    if weights:
        tensors = weights(load_file(directory / "model.safetensors"), torch)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    for name, text in (files or {}).items():
        (directory / name).write_text(text)
    return str(directory)


@pytest.fixture(scope="session")
def broken_checkpoints(checkpoint, tmp_path_factory):
    """Checkpoints that must be refused when they load: a config that disagrees with the weights (more layers,
    fewer layers, a wider MLP), weights that are not finite, a torn weights file, broken remote code; and one
    that must load: an old conversion's rotary inv_freq buffers, which transformers ignores by design."""
    root = tmp_path_factory.mktemp("broken")

    def poisoned(tensors, torch):
        tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = torch.nan
        return tensors

    def with_inv_freq(tensors, torch):
        return tensors | {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(6)}

    broken_code = ("from transformers import LlamaForCausalLM\n\n\nclass BrokenForCausalLM(LlamaForCausalLM):\n"
                   "    def __init__(self, config):\n        super().__init__(config)\n"
                   "        self.model.layers = None.layers\n")
    made = {
        "more_layers": _variant(checkpoint, root / "more_layers", {"num_hidden_layers": 8}),
        "fewer_layers": _variant(checkpoint, root / "fewer_layers", {"num_hidden_layers": 4}),
        "wider": _variant(checkpoint, root / "wider", {"intermediate_size": 256}),
        "nan_weights": _variant(checkpoint, root / "nan_weights", weights=poisoned),
        "broken_code": _variant(checkpoint, root / "broken_code",
                                {"auto_map": {"AutoModelForCausalLM": "modeling_broken.BrokenForCausalLM"}},
                                files={"modeling_broken.py": broken_code}),
        "inv_freq": _variant(checkpoint, root / "inv_freq", weights=with_inv_freq),
        "torn": _variant(checkpoint, root / "torn"),
    }
    torn = root / "torn" / "model.safetensors"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    return made


@pytest.fixture
def files(checkpoint, broken_checkpoints, tmp_path):
    """Files the bad-input tables name as placeholders (see test_bad_input.py)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary.jsonl").write_bytes(b'{"prompt": "a"}\n\x80\xff\xfe binary\n')
    (tmp_path / "array.jsonl").write_text("[1, 2]\n")
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": "x = 1"}) + "\n" + json.dumps({"prompt": "y" * 300}) + "\n")
    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x\n" * 50)
    (tmp_path / "file").write_text("")
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "a \\ud800 b"}\n')
    chats = {"chat_role": [{"role": 3, "content": "hi"}], "chat_null": [{"role": "user", "content": None}],
             "chat_image": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                         {"type": "image_url", "image_url": {"url": "x.png"}}]}],
             "chat_empty": [], "chat_answer_only": [{"role": "assistant", "content": "yes"}]}
    for name, messages in chats.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((Path(checkpoint) / name).read_bytes())
    return {"model": str(checkpoint), "out": str(tmp_path / "out"), "binary": str(tmp_path / "binary.jsonl"),
            "array": str(tmp_path / "array.jsonl"), "long": str(tmp_path / "long.jsonl"),
            "corpus": str(tmp_path / "corpus.txt"), "file": str(tmp_path / "file"), "empty": str(tmp_path / "empty"),
            "no_tokenizer": str(no_tokenizer), "surrogate": str(tmp_path / "surrogate.jsonl")} | {
        name: str(tmp_path / f"{name}.jsonl") for name in chats} | broken_checkpoints
