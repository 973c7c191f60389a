"""eval.py and the `layerskip` lm-eval model on the project's own offline task."""

import importlib.util
import json
import time

import pytest
import torch
from lm_eval.api.instance import Instance

import eval as eval_script
from arguments import run
from self_speculation import GenerationConfig, layers
from self_speculation.lm_eval_model import LayerSkipLM, request_kwargs
from self_speculation.loading import load

LINE = "layerskip_stdlib_line"


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(str(checkpoint))


def evaluate(checkpoint, tmp_path, *extra, tasks=("layerskip_stdlib",), limit="6"):
    out = tmp_path / "out"
    argv = [] if checkpoint is None else ["--model", str(checkpoint)]  # None: the embedded default model
    code = run(eval_script.main, argv + ["--tasks", *tasks, "--limit", limit, "--output_dir", str(out), *extra])
    assert code == 0
    [path] = out.glob("eval_*.json")
    return json.loads(path.read_text())


def samples(directory) -> list[dict]:
    [path] = (directory / "out").glob("eval_*_samples.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def responses(directory, task=LINE) -> dict[int, str]:
    """The generated text of each document of a generation task, by document id."""
    return {r["doc_id"]: r["resps"][0][0] for r in samples(directory) if r["task"] == task}


def test_local_task_end_to_end_same_answers_both_strategies(checkpoint, tmp_path):
    ar = evaluate(checkpoint, tmp_path / "ar", "--log_samples", "True")
    sp = evaluate(checkpoint, tmp_path / "sp", "--generation_strategy", "self_speculative", "--exit_layer", "3",
                  "--num_speculations", "3", "--log_samples", "True")
    for task in ("layerskip_stdlib_mc", LINE):
        assert ar["results"][task] == sp["results"][task], task
    # greedy self-speculative decoding writes what the full model writes, and it writes something
    assert responses(tmp_path / "sp") == responses(tmp_path / "ar")
    assert all(responses(tmp_path / "ar").values())
    assert ar["loglikelihood_scoring"] == sp["loglikelihood_scoring"] == "full model"
    assert sp["speed"]["requests"] == 6 and sp["speed"]["acceptance_rate"] is not None
    assert len(samples(tmp_path / "ar")) == 12


def test_early_exit_scoring_is_recorded(checkpoint, tmp_path):
    result = evaluate(checkpoint, tmp_path, "--exit_layer", "2")
    assert result["loglikelihood_scoring"] == "early exit at layer 2"
    assert 0 <= result["results"]["layerskip_stdlib_mc"]["acc,none"] <= 1


def request(kind, arguments):
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


def test_early_exit_loglikelihood_equals_a_manual_computation(loaded):
    model, tokenizer = loaded
    context, continuation = "def f(x):\n", "    return x"
    full = LayerSkipLM(model, tokenizer)
    early = LayerSkipLM(model, tokenizer, exit_layer=2)
    [(full_ll, _)] = full.loglikelihood([request("loglikelihood", (context, continuation))])
    [(early_ll, _)] = early.loglikelihood([request("loglikelihood", (context, continuation))])
    assert abs(full_ll - early_ll) > 1e-3

    context_ids, continuation_ids = early._encode_pair(context, continuation)  # lm-eval's own tokenisation
    ids = torch.tensor([context_ids + continuation_ids])

    def manual(logits):
        logits = logits[0, len(context_ids) - 1 : -1]
        return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(continuation_ids)[:, None]).sum().item()

    with torch.no_grad():
        assert full_ll == pytest.approx(manual(model(ids).logits), abs=1e-4)
        assert early_ll == pytest.approx(manual(layers.early_exit(model, ids, None, 2).logits), abs=1e-4)


def test_until_is_honoured(loaded):
    model, tokenizer = loaded
    lm = LayerSkipLM(model, tokenizer, generation_strategy="self_speculative", exit_layer=3, num_speculations=3)
    unlimited = lm.generate_until([request("generate_until", ("def f(x):", {"until": ["NEVER"], "max_gen_toks": 40,
                                                                          "do_sample": False}))])[0]
    stop = unlimited[10:12]
    [cut] = lm.generate_until([request("generate_until", ("def f(x):", {"until": [stop], "max_gen_toks": 40,
                                                                     "do_sample": False}))])
    assert unlimited.startswith(cut) and stop not in cut and len(cut) <= 11
    assert lm.speed.requests == 2 and lm.speed.tokens < 80  # the second request stopped early


def test_unknown_task_and_offline_hub_task(checkpoint, tmp_path, monkeypatch, capsys):
    assert run(eval_script.main, ["--model", str(checkpoint), "--tasks", "no_such_task", "--output_dir",
                                  str(tmp_path)]) == 2
    assert "unknown no_such_task" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(eval_script, "hub_reachable", lambda: False)
    assert run(eval_script.main, ["--model", str(checkpoint), "--tasks", "hellaswag", "--limit", "2",
                                  "--output_dir", str(tmp_path)]) == 2
    assert "unreachable; use a local task" in capsys.readouterr().err


def test_generation_requests_in_batches_give_the_same_answers(checkpoint, tmp_path):
    """lm-eval hands a batch of left-padded contexts to the model; each is decoded as it would be alone."""
    alone = evaluate(checkpoint, tmp_path / "one", "--generation_strategy", "self_speculative", "--exit_layer", "3",
                     "--num_speculations", "3", "--log_samples", "True")
    batched = evaluate(checkpoint, tmp_path / "four", "--generation_strategy", "self_speculative", "--exit_layer", "3",
                       "--num_speculations", "3", "--log_samples", "True", "--batch_size", "4")
    assert batched["results"] == alone["results"]
    assert batched["speed"]["requests"] == alone["speed"]["requests"] == 6

    def responses(name, task):
        [path] = (tmp_path / name / "out").glob("eval_*_samples.jsonl")
        return sorted((r["doc_id"], r["resps"]) for r in map(json.loads, path.read_text().splitlines()) if r["task"] == task)

    assert responses("four", "layerskip_stdlib_line") == responses("one", "layerskip_stdlib_line")  # generated text
    # log-likelihoods scored in padded batches round differently in the last digits
    for (doc, batched), (_, single) in zip(responses("four", "layerskip_stdlib_mc"), responses("one", "layerskip_stdlib_mc")):
        assert [r[0][0] for r in batched] == pytest.approx([r[0][0] for r in single], rel=1e-5), doc


# --- generation flags: a flag given wins over the task's generation_kwargs, and the JSON records what ran ---------

@pytest.fixture(scope="module")
def line_run(checkpoint, tmp_path_factory):
    """eval.py on two documents of the line task with some flags, run once per set of flags: (its JSON document,
    the responses by document)."""
    runs = {}

    def line_run(*flags):
        if flags not in runs:
            directory = tmp_path_factory.mktemp("line")
            document = evaluate(checkpoint, directory, "--log_samples", "True", *flags, tasks=(LINE,), limit="2")
            runs[flags] = document, responses(directory)
        return runs[flags]

    return line_run


def ran(document) -> dict:
    """The configuration the line task's requests ran with."""
    return document["generation"][LINE]


def test_without_flags_the_task_decides(line_run):
    document, answers = line_run()
    config = ran(document)
    # the task's max_gen_toks, greedy decoding and until (lm-eval adds the end of text)
    assert (config["max_steps"], config["sample"], config["stop_words"]) == (32, False, ["\n\n", "</s>"])
    assert document["arguments"]["generation_flags_given"] == [] and all(answers.values())


def test_max_steps_bounds_the_answers(line_run):
    document, answers = line_run("--max_steps", "2")
    assert document["speed"]["requests"] == 2 and document["speed"]["tokens"] == 4  # 2 tokens each, not 32
    assert answers != line_run()[1]
    assert ran(document)["max_steps"] == 2 and document["arguments"]["generation"]["max_steps"] == 2
    assert document["arguments"]["generation_flags_given"] == ["max_steps"]


def test_stop_token_ids_stop_the_answers(line_run):
    every_token = [str(i) for i in range(258)]  # the byte tokenizer's vocabulary: every answer stops at once
    document, answers = line_run("--stop_token_ids", *every_token)
    assert document["speed"]["tokens"] == document["speed"]["requests"] == 2
    assert answers != line_run()[1]
    assert ran(document)["stop_token_ids"] == list(range(258))


def test_stop_words_are_added_to_the_tasks_until(line_run):
    before = line_run()[1][0]
    word = next(c for c in before if c.isascii() and c.isalnum() and before.index(c) > 0)
    document, answers = line_run("--stop_words", word)
    assert answers[0] == before[: before.index(word)]
    assert ran(document)["stop_words"] == ["\n\n", word, "</s>"]


def test_no_repeat_ngram_size_changes_the_answers(line_run):
    document, answers = line_run("--no_repeat_ngram_size", "1")
    assert answers != line_run()[1]
    assert ran(document)["no_repeat_ngram_size"] == 1


def test_sampling_flags_change_the_answers(line_run):
    greedy = line_run()[1]
    sampled, sampled_answers = line_run("--sample", "True")
    assert sampled_answers != greedy
    assert ran(sampled)["sample"] and ran(sampled)["temperature"] == 0.6  # the task is greedy: --temperature's default
    hot, hot_answers = line_run("--temperature", "3")  # a sampling flag samples
    assert hot_answers not in (greedy, sampled_answers)
    assert ran(hot)["sample"] and ran(hot)["temperature"] == 3.0
    top_k, top_k_answers = line_run("--sample", "True", "--top_k", "1")
    assert top_k_answers == greedy and ran(top_k)["top_k"] == 1  # sampling among one token is greedy decoding
    top_p, top_p_answers = line_run("--sample", "True", "--top_p", "0.001")
    assert top_p_answers == greedy and ran(top_p)["top_p"] == 0.001
    off, off_answers = line_run("--sample", "False", "--temperature", "3")
    assert off_answers == greedy and not ran(off)["sample"]


def test_compile_runs_compiled(line_run):
    document, answers = line_run("--compile", "True", "--max_steps", "3")
    assert document["speed"].get("compiled_passes") == [[0, 6, 1]]
    assert answers == line_run("--max_steps", "3")[1] and ran(document)["compile"]


def test_each_task_records_what_it_ran(checkpoint, tmp_path):
    """A second generation task with other settings: --stop_words add to each task's own until."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "other.yaml").write_text(
        f"include: {eval_script.LOCAL_TASKS / 'layerskip_stdlib' / 'stdlib_line.yaml'}\ntask: other_line\ntag: []\n"
        "generation_kwargs:\n  until: [';']\n  max_gen_toks: 5\n  do_sample: false\n")
    document = evaluate(checkpoint, tmp_path, "--include_path", str(tasks), "--stop_words", "zz",
                        tasks=(LINE, "other_line"), limit="2")
    assert {task: (c["max_steps"], c["stop_words"]) for task, c in document["generation"].items()} == {
        LINE: (32, ["\n\n", "zz", "</s>"]), "other_line": (5, [";", "zz", "</s>"])}


def test_a_flag_given_wins_over_the_task():
    task = {"until": ["\n\n"], "max_gen_toks": 32, "max_new_tokens": 7, "do_sample": True, "temperature": 0.2,
            "top_p": 0.95}
    flags = GenerationConfig(max_steps=4, temperature=0.9, top_k=5, top_p=0.5, stop_words=["\n\n", "x"])
    assert request_kwargs(task, flags, set()) == task
    assert request_kwargs(task, flags, {"max_steps", "stop_words", "top_k"}) == {
        "until": ["\n\n", "x"], "max_gen_toks": 4, "do_sample": True, "temperature": 0.2, "top_p": 0.95, "top_k": 5}
    greedy = {"until": "\n", "do_sample": False, "temperature": 0.0}
    assert request_kwargs(greedy, flags, {"top_p"}) == greedy | {"do_sample": True, "temperature": 0.9, "top_p": 0.5}
    assert request_kwargs(greedy, flags, {"sample", "top_p"})["do_sample"]  # --sample's value: True
    not_sampled = request_kwargs(greedy, GenerationConfig(sample=False, temperature=2.0), {"sample", "temperature"})
    assert not_sampled == greedy | {"temperature": 2.0}  # --sample False wins: the temperature does nothing


# --- the line task measures the embedded model ---------------------------------------------------------------------

def test_the_line_task_scores_the_next_line():
    path = eval_script.LOCAL_TASKS / "layerskip_stdlib" / "utils.py"
    spec = importlib.util.spec_from_file_location("stdlib_task", path)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    docs = utils.load_line()["test"]
    assert all(not d["context"].endswith("\n") and d["target"].startswith("\n") and d["target"].count("\n") == 1
               for d in docs)
    doc = {"target": "\n        return x"}
    answer = "\n        return x\n    def g(self):"  # the model's next line, then more
    assert utils.process_line(doc, [answer]) == {"exact_match": 1.0, "edit_similarity": 1.0}
    assert utils.process_line(doc, ["\n        return y"])["edit_similarity"] == pytest.approx(0.875)
    assert utils.process_line(doc, [" or x\n        return x"])["exact_match"] == 0.0  # the line goes on, no new line


def test_the_line_task_scores_the_embedded_model_and_tells_an_early_exit_apart(tmp_path):
    """Every context ends at the end of a line (never in a bare newline, which the tokenizer merges with the next
    line's indentation); the answer is the model's next line."""
    full = evaluate(None, tmp_path / "full", "--log_samples", "True", tasks=(LINE,), limit="48")
    early = evaluate(None, tmp_path / "early", "--exit_layer", "3", tasks=(LINE,), limit="48")
    score = full["results"][LINE].get("edit_similarity,none", 0.0)
    assert score > 0.2  # measured: 0.245 (exact match: 0, a model this small rarely writes a line exactly)
    assert score - early["results"][LINE]["edit_similarity,none"] > 0.03  # measured: 0.173 at layer 3
    assert full["n_samples"][LINE]["effective"] == 48
    answers = responses(tmp_path / "full")
    assert sum(a.startswith("\n") for a in answers.values()) >= 36  # the model mostly begins a new line


# --- runs ---------------------------------------------------------------------------------------------------------

def test_runs_started_in_the_same_second_keep_their_own_files(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda *args: "20250101_000000")
    for _ in range(2):
        code = run(eval_script.main, ["--model", str(checkpoint), "--tasks", LINE, "--limit", "1", "--max_steps", "2",
                                      "--log_samples", "True", "--output_dir", str(tmp_path)])
        assert code == 0
    documents = sorted(tmp_path.glob("eval_*.json"))
    assert len(documents) == 2
    for path in documents:
        run_id = json.loads(path.read_text())["run_id"]
        assert run_id == path.stem
        records = (tmp_path / f"{run_id}_samples.jsonl").read_text().splitlines()
        assert records and all(json.loads(r)["run_id"] == run_id for r in records)


def test_an_interrupted_run_keeps_the_generations_it_finished(checkpoint, tmp_path, monkeypatch):
    """lm-eval hands its samples over only at the end: ctrl-c at the third batch of generations wrote nothing."""
    from self_speculation import Generator

    real, calls = Generator.generate_batch, []

    def interrupted(generator, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(generator, prompts, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate_batch", interrupted)
    code = run(eval_script.main, ["--model", str(checkpoint), "--tasks", LINE, "--limit", "6", "--max_steps", "4",
                                  "--batch_size", "2", "--log_samples", "True", "--output_dir", str(tmp_path)])
    assert code == 130
    [path] = tmp_path.glob("eval_*_generations.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == sum(calls[:2]) == 4 and all(r["task"] == LINE and r["prompt"] for r in records)
    assert records[0]["run_id"] == path.name.removesuffix("_generations.jsonl")


def test_a_malformed_task_file_is_named_rather_than_called_an_unknown_task(checkpoint, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\noutput_type: [generate_until\n")  # an unclosed list
    assert run(eval_script.main, ["--model", str(checkpoint), "--tasks", "mine", "--include_path", str(tasks),
                                  "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --tasks: unknown mine; 1 task file(s) under --include_path could not be read, "
                            f"the first {tasks / 'mine.yaml'} (")


def test_a_task_whose_local_data_file_is_missing_says_so_not_that_the_hub_is_unreachable(checkpoint, tmp_path,
                                                                                        capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(
        "task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(tmp_path / "gone.jsonl")
        + "\ntest_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match\n")
    assert run(eval_script.main, ["--model", str(checkpoint), "--tasks", "mine", "--include_path", str(tasks),
                                  "--output_dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --tasks mine: a data file of the task is missing"), error
