"""eval.py and the `layerskip` lm-eval model on the project's own offline task."""

import json

import pytest
import torch
from lm_eval.api.instance import Instance

import eval as eval_script
from arguments import run
from self_speculation import layers
from self_speculation.lm_eval_model import LayerSkipLM
from self_speculation.loading import load


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load(str(checkpoint))


def evaluate(checkpoint, tmp_path, *extra):
    out = tmp_path / "out"
    code = run(eval_script.main, ["--model", str(checkpoint), "--tasks", "layerskip_stdlib", "--limit", "6",
                                  "--output_dir", str(out), *extra])
    assert code == 0
    [path] = out.glob("eval_*.json")
    return json.loads(path.read_text())


def test_local_task_end_to_end_same_answers_both_strategies(checkpoint, tmp_path):
    ar = evaluate(checkpoint, tmp_path / "ar", "--log_samples", "True")
    sp = evaluate(checkpoint, tmp_path / "sp", "--generation_strategy", "self_speculative", "--exit_layer", "3",
                  "--num_speculations", "3")
    for task in ("layerskip_stdlib_mc", "layerskip_stdlib_line"):
        assert ar["results"][task] == sp["results"][task], task
    assert ar["loglikelihood_scoring"] == sp["loglikelihood_scoring"] == "full model"
    assert sp["speed"]["requests"] == 6 and sp["speed"]["acceptance_rate"] is not None
    [samples] = (tmp_path / "ar" / "out").glob("eval_*_samples.jsonl")
    assert len(samples.read_text().splitlines()) == 12


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
