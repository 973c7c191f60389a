"""Evaluate lm-evaluation-harness tasks through the LayerSkip generator.

    python eval.py --tasks layerskip_stdlib --exit_layer 6                      # early-exit scores, offline
    python eval.py --model DIR --tasks layerskip_stdlib_line --generation_strategy self_speculative

Generation tasks run the chosen strategy; log-likelihood tasks score with the early exit when the strategy is
autoregressive and --exit_layer is set, else with the full model (self-speculative decoding is lossless, so it
cannot change those scores). Writes eval_<time>.json (lm-eval's results, speed figures, configuration) to
--output_dir, and eval_<time>_samples.jsonl with --log_samples.
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from arguments import BatchArguments, GenerationArguments, ModelArguments, parse, run
from self_speculation import UsageError
from self_speculation.loading import hub_reachable
from self_speculation.results import append_jsonl, ensure_output_dir, write_json

LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"


@dataclass
class EvalArguments:
    tasks: list[str] = field(default_factory=lambda: ["layerskip_stdlib"],
                             metadata={"help": "lm-eval task, group or tag names"})
    limit: float | None = field(default=None, metadata={"help": "examples per task (a fraction if < 1)"})
    num_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples (default: the task's)"})
    include_path: list[str] = field(default_factory=list,
                                    metadata={"help": "more directories of task YAMLs (this project's tasks/ always)"})
    log_samples: bool = field(default=False, metadata={"help": "also write every request and response"})
    apply_chat_template: bool = field(default=False, metadata={"help": "format prompts with the chat template"})
    allow_code_execution: bool = field(
        default=False, metadata={"help": "allow tasks that execute generated code (e.g. humaneval) to run it"}
    )

    def __post_init__(self):
        if self.limit is not None and self.limit <= 0:
            raise UsageError(f"--limit must be > 0 (got {self.limit})")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UsageError(f"--num_fewshot must be >= 0 (got {self.num_fewshot})")
        for path in self.include_path:
            if not Path(path).is_dir():
                raise UsageError(f"--include_path {path}: no such directory")


def main(argv: list[str] | None = None) -> int:
    model_args, config, batching, args = parse((ModelArguments, GenerationArguments, BatchArguments, EvalArguments), argv)
    out = ensure_output_dir(model_args.output_dir)
    online = hub_reachable()
    if not online:  # hub datasets fail at once instead of retrying
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from self_speculation.lm_eval_model import LayerSkipLM, evaluate

    task_manager = TaskManager(include_path=[str(LOCAL_TASKS)] + args.include_path)
    unknown = [t for t in args.tasks if t not in task_manager.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: unknown {', '.join(unknown)} (add their YAML directory with --include_path)")
    model, tokenizer = model_args.load()
    if args.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--apply_chat_template: the model {model_args.model} has no chat template")
    lm = LayerSkipLM(model, tokenizer, config.generation_strategy, config.exit_layer, config.num_speculations,
                     seed=model_args.seed, batch_size=batching.batch_size)
    results = evaluate(lm, task_manager, args.tasks, online, num_fewshot=args.num_fewshot, limit=args.limit,
                       log_samples=args.log_samples, apply_chat_template=args.apply_chat_template,
                       random_seed=model_args.seed, numpy_random_seed=model_args.seed,
                       torch_random_seed=model_args.seed, fewshot_random_seed=model_args.seed,
                       confirm_run_unsafe_code=args.allow_code_execution)
    stem = out / f"eval_{time.strftime('%Y%m%d_%H%M%S')}"
    arguments = {"model": dataclasses.asdict(model_args), "generation": dataclasses.asdict(lm.generation),
                 "eval": dataclasses.asdict(args) | batching.settings()}
    write_json(stem.with_suffix(".json"), {"arguments": arguments} | lm.document(results))
    if args.log_samples:
        samples_path = stem.with_name(stem.name + "_samples.jsonl")
        for task, samples in results["samples"].items():
            for sample in samples:
                append_jsonl(samples_path, {"task": task} | sample)
    print(make_table(results))
    print(lm.summary_line(stem.with_suffix(".json")))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
