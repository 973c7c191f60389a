"""Dataset loaders on small local files, and the offline error for hub datasets."""

import json
import re
import time

import pandas as pd
import pytest

import data
from data import DataOptions, load_examples
from self_speculation import UsageError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ARTICLES = [{"article": f"word{i} " * 120 + "end", "highlights": f"summary {i}"} for i in range(4)]


def test_cnn_dm_summarization_n_shot(tmp_path):
    path = write_jsonl(tmp_path / "cnn.jsonl", ARTICLES)
    examples = load_examples("cnn_dm_summarization", DataOptions(path, n_shot=1))
    assert len(examples) == 3  # the shot is not evaluated
    prompt = examples[0].prompt
    assert prompt.count("Article: ") == 2 and prompt.endswith("Summary:") and prompt.count("Summary: summary") == 1
    assert examples[0].reference.startswith("summary ")


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_xsum_from_other_formats(tmp_path, suffix):
    frame = pd.DataFrame([{"document": "A long text.", "summary": "Short."}, {"document": "Other.", "summary": "S."}])
    path = tmp_path / f"xsum{suffix}"
    {".parquet": frame.to_parquet, ".csv": lambda p: frame.to_csv(p, index=False),
     ".json": lambda p: frame.to_json(p, orient="records")}[suffix](path)
    examples = load_examples("xsum_summarization", DataOptions(str(path)))
    assert [e.reference for e in examples] == ["Short.", "S."]
    assert examples[0].prompt == "Article: A long text.\nSummary:"


def test_cnn_dm_lm_splits_after_100_words(tmp_path):
    path = write_jsonl(tmp_path / "cnn.jsonl", ARTICLES[:1])
    [example] = load_examples("cnn_dm_lm", DataOptions(path))
    assert len(example.prompt.split(" ")) == 100 and example.reference.endswith("end")


def test_top_v2(tmp_path):
    path = write_jsonl(tmp_path / "top.jsonl", [{"utterance": "wake me at 7", "semantic_parse": "[IN:CREATE_ALARM ]"}])
    [example] = load_examples("top_v2", DataOptions(path))
    assert example.prompt == "Utterance: wake me at 7\nSemantic parse:" and example.reference == "[IN:CREATE_ALARM ]"


def test_human_eval_offline():
    examples = load_examples("human_eval", DataOptions())
    assert len(examples) == 164 and examples[0].prompt.startswith("from typing import List")


def test_custom_jsonl_fields_template_shuffle_and_count(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(10)])
    options = DataOptions(path, prompt_field="q", response_field="a", seed=3)
    examples = load_examples("custom_jsonl", options, num_samples=4, shuffle=True, template="<s>{message}</s>")
    assert len(examples) == 4 and all(e.prompt.startswith("<s>question ") for e in examples)
    assert examples == load_examples("custom_jsonl", options, num_samples=4, shuffle=True, template="<s>{message}</s>")
    assert [e.prompt for e in examples] != [f"<s>question {i}</s>" for i in range(4)]


def test_chat_format(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}]}])
    [example] = load_examples("chat_format", DataOptions(path))
    assert example.prompt == "System: Be brief.\nUser: Hi?\nAssistant:" and example.reference == "Hello."


def test_chat_format_joins_the_text_parts_of_multi_part_content(tmp_path):
    """The multi-part form used to become its Python repr, and as a reference crashed the ROUGE step."""
    parts = [{"type": "text", "text": "Look at this:"}, {"type": "text", "text": "x = 1"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": "A name."}]}]}])
    [example] = load_examples("chat_format", DataOptions(path))
    assert example.prompt == "User: Look at this:\nx = 1\nAssistant:" and example.reference == "A name."


@pytest.mark.parametrize(
    "dataset, content, fragment",
    [
        ("cnn_dm_summarization", '{"article": "a", "highlights": "b"}\n{"article": "a"', "line 2"),
        ("cnn_dm_summarization", '{"article": "a"}\n', "missing text field 'highlights'"),
        ("chat_format", '{"messages": "nope"}\n', "line 1"),
        ("custom_jsonl", '{"text": "x"}\n', "line 1"),
    ],
)
def test_malformed_files_name_the_line(tmp_path, dataset, content, fragment):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UsageError, match=fragment):
        load_examples(dataset, DataOptions(str(path)))


def test_hub_dataset_offline_fails_fast_and_names_data_path(monkeypatch):
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(UsageError, match="--data_path"):
        load_examples("xsum_summarization", DataOptions())
    assert time.perf_counter() - start < 2


def test_bad_template_and_dataset():
    with pytest.raises(UsageError, match=r"\{message\}"):
        load_examples("human_eval", DataOptions(), template="no placeholder")
    with pytest.raises(UsageError, match="--dataset"):
        load_examples("imagenet", DataOptions())


def test_json_strings_may_hold_unicode_line_breaks(tmp_path):
    """JSON Lines end lines at "\\n" only: U+2028, U+2029, U+0085 and a form feed inside a JSON string (valid as they
    are) were split on by str.splitlines, and the file refused as not valid JSON. Windows line ends still work."""
    prompts = ["a\u2028b", "c\u2029d", "e\x85f", "g\x0ch"]
    path = tmp_path / "u.jsonl"
    path.write_text("\r\n".join(json.dumps({"prompt": p}, ensure_ascii=False) for p in prompts) + "\r\n",
                    encoding="utf-8", newline="")
    examples = load_examples("custom_jsonl", DataOptions(str(path)), num_samples=10)
    assert [e.prompt for e in examples] == prompts


@pytest.mark.parametrize("dataset, rows, fragment", [
    ("human_eval", [{"prompt": "   ", "canonical_solution": "x"}], "example 1: the prompt is empty"),
    ("cnn_dm_lm", [{"article": ""}], "row 1: the text field 'article' is empty"),
    ("cnn_dm_summarization", [{"article": "a b", "highlights": " "}], "row 1: the text field 'highlights' is empty"),
    ("custom_jsonl", [{"prompt": "p", "response": 3}], "line 1: 'response' must be text or null (got 3)"),
    ("human_eval", [{"prompt": "def f():", "canonical_solution": ["x"]}], "'canonical_solution' must be text or null"),
])
def test_empty_prompts_and_references_that_are_not_text_are_refused_by_every_loader(tmp_path, dataset, rows, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UsageError, match=re.escape(fragment)):
        load_examples(dataset, DataOptions(path))


@pytest.mark.parametrize("dataset, field", [("custom_jsonl", "response"), ("human_eval", "canonical_solution")])
def test_a_null_or_missing_reference_is_no_reference_not_the_text_none(tmp_path, dataset, field):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "def f():", field: None}, {"prompt": "def g():"}])
    assert [e.reference for e in load_examples(dataset, DataOptions(path))] == ["", ""]


def test_a_response_field_that_is_the_prompt_field_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "question"}])
    with pytest.raises(UsageError, match="--response_field q is the prompt's own field"):
        load_examples("custom_jsonl", DataOptions(path, prompt_field="q", response_field="q"))
