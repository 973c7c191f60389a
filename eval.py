"""Evaluate lm-evaluation-harness tasks through the LayerSkip generator.

    python eval.py --tasks layerskip_stdlib --exit_layer 6                      # early-exit scores, offline
    python eval.py --model DIR --tasks layerskip_stdlib_line --generation_strategy self_speculative
    python eval.py --tasks layerskip_stdlib_line --max_steps 16 --stop_words "):"  # the task's settings, changed

Generation tasks run the chosen strategy; log-likelihood tasks score with the early exit when the strategy is
autoregressive and --exit_layer is set, else with the full model (self-speculative decoding is lossless, so it
cannot change those scores).

A generation task brings its own generation_kwargs; the generation flags given on the command line win over them,
and a flag not given leaves the task's value: --max_steps replaces max_gen_toks; --sample, --temperature, --top_k,
--top_p and --no_repeat_ngram_size replace the task's values (a sampling flag given samples unless --sample False
is given too; sampling asked for on a greedy task samples at --temperature, 0.6 unless given); --stop_words are
added to the task's `until` (its stop sequences are part of its definition). --stop_token_ids, --compile and the
strategy flags are no task's business and always apply. The JSON records, per generation task, the configuration
that ran (`generation`), besides the flags as parsed and which of them were given.

Writes eval_<time>_<id>.json (the run id, lm-eval's results, speed figures, configuration) to --output_dir, and
with --log_samples its _samples.jsonl (at the end) and _generations.jsonl (each generation as its batch finishes,
kept if the run is interrupted), each record carrying the run id: runs started together never share files.
"""

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from arguments import BatchArguments, GenerationArguments, ModelArguments, given_flags, parse, run, warn_unused
from self_speculation import UsageError
from self_speculation.errors import check_range
from self_speculation.loading import hub_reachable
from self_speculation.results import append_jsonl, ensure_output_dir, new_run, write_json

LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"
GENERATION_FLAGS = {f.name for f in fields(GenerationArguments)}
TASK_HELP = {  # a generation task brings these; the flag, when given, wins (see the docstring)
    "--max_steps": ("maximum number of new tokens (>= 1) (default: the task's max_gen_toks)", None),
    "--sample": ("sample (True) or greedy decoding (False) (default: the task's; a sampling flag given samples)",
                 None),
    "--temperature": ("sampling temperature (> 0) (default: the task's, else 0.6)", None),
    "--top_k": ("keep the k most likely tokens when sampling (0: all) (default: the task's, else 0)", None),
    "--top_p": ("nucleus sampling mass, in (0, 1] (default: the task's, else 0.9)", None),
    "--no_repeat_ngram_size": ("forbid repeating n-grams of this size (0: off) (default: the task's, else 0)", None),
    "--stop_words": ("stop after any of these strings, besides the task's own `until`", None),
}
SCORING_FLAGS = {"generation_strategy", "exit_layer"}  # which layer scores log-likelihoods; the rest only generate


@dataclass
class EvalArguments:
    tasks: list[str] = field(default_factory=lambda: ["layerskip_stdlib"], metadata={
        "help": "lm-eval task, group or tag names. A generation flag given on the command line wins over a task's "
                "generation_kwargs (--stop_words are added to its until); one not given leaves the task's value"})
    limit: float | None = field(default=None, metadata={"help": "examples per task (a fraction if < 1)"})
    num_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples (default: the task's)"})
    include_path: list[str] = field(default_factory=list,
                                    metadata={"help": "more directories of task YAMLs (this project's tasks/ always)"})
    log_samples: bool = field(default=False, metadata={
        "help": "also write every request and response (_samples.jsonl, at the end), and every generation as it "
                "finishes (_generations.jsonl, kept if the run is interrupted)"})
    apply_chat_template: bool = field(default=False, metadata={"help": "format prompts with the chat template"})
    allow_code_execution: bool = field(
        default=False, metadata={"help": "allow tasks that execute generated code (e.g. humaneval) to run it"}
    )

    def __post_init__(self):
        if self.limit is not None:
            check_range("--limit", self.limit, 0, low_open=True)
            if self.limit >= 1 and self.limit != math.floor(self.limit):
                raise UsageError(f"--limit must be a fraction below 1 or a whole number of examples (got {self.limit})")
        if self.num_fewshot is not None and self.num_fewshot < 0:  # an int: never nan, but maybe too big for floats
            raise UsageError(f"--num_fewshot must be an integer >= 0 (got {self.num_fewshot})")
        for path in self.include_path:
            if not Path(path).is_dir():
                raise UsageError(f"--include_path {path}: no such directory")


def task_index(names: list[str], include_path: list[str]):
    """An lm-eval TaskManager for `names`: this project's tasks and --include_path alone when they hold every name
    as a task or tag (indexing lm-eval's own task files takes about 10 s), else with lm-eval's tasks too."""
    from lm_eval.tasks import TaskManager

    paths = [str(LOCAL_TASKS)] + include_path
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(name in local.all_subtasks or name in local.all_tags for name in names):
        return local
    return TaskManager(include_path=paths)


def unreadable_task_files(include_path: list[str]) -> list[str]:
    """The YAML files under --include_path that lm-eval's index skips in silence (it logs them at debug level), as
    "path (the error)": a malformed one is why a task named in --tasks is unknown."""
    from lm_eval.tasks._yaml_loader import load_yaml  # what lm-eval's TaskManager reads task files with

    broken = []
    for path in sorted(p for directory in include_path for p in Path(directory).rglob("*.y*ml")):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as error:  # yaml's errors, a missing include, a file that is not a mapping
            broken.append(f"{path} ({str(error).splitlines()[0]})")
    return broken


ARGUMENTS = (ModelArguments, GenerationArguments, BatchArguments, EvalArguments)


def main(argv: list[str] | None = None) -> int:
    model_args, config, batching, args = parse(ARGUMENTS, argv, doc=__doc__, help=TASK_HELP)
    given = given_flags(argv) & GENERATION_FLAGS
    out = ensure_output_dir(model_args.output_dir)
    stem = new_run(out, "eval")
    online = hub_reachable()
    if not online:  # hub datasets fail at once instead of retrying
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval.utils import make_table

    from self_speculation.lm_eval_model import LayerSkipLM, evaluate

    task_manager = task_index(args.tasks, args.include_path)
    unknown = [t for t in args.tasks if t not in task_manager.all_tasks]
    if unknown and (broken := unreadable_task_files(args.include_path)):
        raise UsageError(f"--tasks: unknown {', '.join(unknown)}; {len(broken)} task file(s) under --include_path "
                         f"could not be read, the first {broken[0]}")
    if unknown:
        raise UsageError(f"--tasks: unknown {', '.join(unknown)} (add their YAML directory with --include_path)")
    model, tokenizer = model_args.load()
    if args.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--apply_chat_template: the model {model_args.model} has no chat template")
    lm = LayerSkipLM(model, tokenizer, config=config, given=given, seed=model_args.seed,
                     batch_size=batching.batch_size)
    if args.log_samples:
        lm.generations = (stem.with_name(stem.name + "_generations.jsonl"), stem.name)
    warn_unused(argv, {lm.strategy.name: lm.strategy.flags}, batching.batch_size)
    results = evaluate(lm, task_manager, args.tasks, online, num_fewshot=args.num_fewshot, limit=args.limit,
                       log_samples=args.log_samples, apply_chat_template=args.apply_chat_template,
                       random_seed=model_args.seed, numpy_random_seed=model_args.seed,
                       torch_random_seed=model_args.seed, fewshot_random_seed=model_args.seed,
                       confirm_run_unsafe_code=args.allow_code_execution)
    run_id = stem.name
    arguments = {"model": dataclasses.asdict(model_args), "generation": dataclasses.asdict(config),
                 "generation_flags_given": sorted(given), "eval": dataclasses.asdict(args) | batching.settings()}
    write_json(stem.with_suffix(".json"), {"run_id": run_id, "arguments": arguments} | lm.document(results))
    if args.log_samples:
        samples_path = stem.with_name(run_id + "_samples.jsonl")
        for task, samples in results["samples"].items():
            for sample in samples:
                append_jsonl(samples_path, {"run_id": run_id, "task": task} | sample)
    if not lm.ran and (unused := sorted(given - SCORING_FLAGS)):  # no task generated anything
        print(f"warning: {', '.join('--' + f for f in unused)} ignored: the tasks score log-likelihoods and "
              "generate nothing", file=sys.stderr)
    print(make_table(results))
    print(lm.summary_line(stem.with_suffix(".json")))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
