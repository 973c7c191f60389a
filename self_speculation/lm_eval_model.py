"""lm-evaluation-harness model `layerskip`: Hugging Face's HFLM with two hooks replaced and one wrapped.

- `generate_until` applies the generation flags the command line gave to each request's generation_kwargs
  (`request_kwargs`: a flag given wins over the task's value, stop words add to the task's `until`) and records,
  per task, the configuration that ran.
- `_model_generate` runs our generator with the chosen strategy, honouring each request's `until`, `max_gen_toks`,
  `do_sample`, `temperature`, `top_k`, `top_p` and `no_repeat_ngram_size`, and collects speed figures.
- `_model_call` (loglikelihood, loglikelihood_rolling) scores with the early exit when the strategy is
  autoregressive and an exit layer is set; otherwise with the full model. Self-speculative decoding is lossless,
  so it cannot change log-likelihood scores: those always come from the full model.
"""

import dataclasses
import json
import re
from collections.abc import Iterable

import lm_eval
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs

from . import layers
from .config import GenerationConfig
from .generator import Generator
from .errors import UsageError
from .loading import load
from .results import append_jsonl
from .strategies import configured


@dataclasses.dataclass
class SpeedTotals:
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0

    def add(self, results: list) -> None:
        """The results of one batch (their `total_time` is the batch's wall time, counted once)."""
        self.requests += len(results)
        self.tokens += sum(r.num_tokens for r in results)
        self.seconds += results[0].total_time
        self.drafted += sum(r.drafted for r in results)
        self.accepted += sum(r.accepted for r in results)

    def summary(self) -> dict:
        return dataclasses.asdict(self) | {
            "tokens_per_second": self.tokens / self.seconds if self.seconds else None,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
        }


# The generation flags a task's generation_kwargs also set (lm-eval's names): a flag the command line gave replaces
# the task's value; --stop_words add to the task's `until` instead. The other generation flags (strategy, exit layer,
# drafts, --compile, --stop_token_ids) are no task's business and always apply.
TASK_KEYS = {"max_steps": "max_gen_toks", "sample": "do_sample", "temperature": "temperature", "top_k": "top_k",
             "top_p": "top_p", "no_repeat_ngram_size": "no_repeat_ngram_size"}
SAMPLING_FLAGS = {"temperature", "top_k", "top_p"}
MAX_TOKENS_ALIASES = ("max_new_tokens", "max_tokens", "max_completion_tokens")  # lm-eval's other names of max_gen_toks


def request_kwargs(task: dict, flags: GenerationConfig, given: Iterable[str]) -> dict:
    """A request's generation_kwargs (the task's) with the flags the command line gave: a flag given replaces the
    task's value, --stop_words are added to its `until`, a flag not given leaves the task's value. Giving a sampling
    flag (--temperature, --top_k, --top_p) samples unless --sample False is given too, and sampling asked for on a
    task without a temperature above 0 samples at --temperature's value (0.6 unless given)."""
    given = set(given)
    kwargs = dict(task)
    for flag, key in TASK_KEYS.items():
        if flag in given:
            kwargs[key] = getattr(flags, flag)
    if "max_steps" in given:
        for alias in MAX_TOKENS_ALIASES:
            kwargs.pop(alias, None)
    if given & SAMPLING_FLAGS and "sample" not in given:
        kwargs["do_sample"] = True
    asked = given & (SAMPLING_FLAGS | {"sample"})
    if kwargs.get("do_sample") and asked and not float(kwargs.get("temperature") or 0) > 0:
        kwargs["temperature"] = flags.temperature
    if "stop_words" in given:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        kwargs["until"] = until + [w for w in flags.stop_words if w not in until]
    return kwargs


def _number(kwargs: dict, key: str, default, kind):
    value = kwargs.get(key)
    return default if value is None else kind(value)


@register_model("layerskip")
class LayerSkipLM(HFLM):
    """`config` is the generation flags and `given` the names of those the command line set (eval.py); without a
    config (lm-eval's own command line, `--model_args pretrained=DIR,exit_layer=4`), the strategy flags come one by
    one and the tasks' generation_kwargs decide the rest."""

    def __init__(
        self,
        pretrained,
        tokenizer=None,
        generation_strategy: str = "autoregressive",
        exit_layer: int = -1,
        num_speculations: int = -1,
        seed: int = 42,
        dtype: str = "auto",
        device: str = "auto",
        config: GenerationConfig | None = None,
        given: Iterable[str] = (),
        **kwargs,
    ):
        if isinstance(pretrained, str):
            pretrained, loaded_tokenizer = load(pretrained, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer
        if config is None:
            config = GenerationConfig(
                generation_strategy=generation_strategy, exit_layer=int(exit_layer),
                num_speculations=int(num_speculations), sample=False,
            )
        self.flags, self.given = config, frozenset(given)
        # checked once, with the checkpoint's defaults; each request's settings replace the task's part of it
        self.strategy, self.generation = configured(config, pretrained.config)
        self.seed = int(seed)
        self.speed = SpeedTotals()
        self.generators: dict[str, Generator] = {}  # one per configuration run: --compile compiles once for each
        self.ran: dict[str, list[dict]] = {}  # task -> the configurations its requests ran with
        self._task: str | None = None  # the task generate_until is running
        # eval.py --log_samples: (path, run id) where every generation is appended as its batch finishes, so that an
        # interrupted run keeps them (lm-eval hands its samples over only at the end)
        self.generations: tuple | None = None
        batch_size = int(kwargs.pop("batch_size", 1) or 1)  # requests lm-eval hands over together
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size, **kwargs)

    @property
    def scoring_layer(self) -> int:
        """Where log-likelihoods are scored: the layer whose distribution the strategy generates from."""
        return self.strategy.output_layer(self.generation, layers.num_layers(self.model))

    @property
    def scores_with_early_exit(self) -> bool:
        return self.scoring_layer < layers.num_layers(self.model)

    @property
    def scoring(self) -> str:
        return f"early exit at layer {self.scoring_layer}" if self.scores_with_early_exit else "full model"

    def document(self, results: dict) -> dict:
        """What eval.py writes besides its arguments: lm-eval's results, how log-likelihoods were scored, speed."""
        return json.loads(json.dumps({
            "loglikelihood_scoring": self.scoring,
            "results": results["results"],
            "groups": results.get("groups", {}),
            "n_samples": results.get("n-samples", {}),
            "versions": results.get("versions", {}),
            "generation": {task: configs[0] if len(configs) == 1 else configs for task, configs in self.ran.items()},
            "speed": self.speed.summary() | {"compiled_passes": self.compiled_passes},
        }, default=str))

    @property
    def compiled_passes(self) -> list[list[int]]:
        """The passes (start layer, end layer, new tokens) that ran through torch.compile."""
        shapes = {shape for g in self.generators.values() if g.compiled for shape in g.compiled.shapes_run}
        return [list(shape) for shape in sorted(shapes)]

    def summary_line(self, path) -> str:
        speed, line = self.speed.summary(), ""
        if speed["requests"]:
            acceptance = "" if speed["acceptance_rate"] is None else f", acceptance {100 * speed['acceptance_rate']:.1f}%"
            line = f"generation: {speed['requests']} requests, {speed['tokens_per_second']:.1f} tokens/s{acceptance}\n"
        return line + f"log-likelihoods scored with the {self.scoring}; results in {path}"

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if not self.scores_with_early_exit:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            return layers.early_exit(self.model, inps, None, self.scoring_layer).logits

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """lm-eval's generate_until, one task at a time, with the command line's flags applied to each request's
        generation_kwargs (in place: the samples lm-eval logs show what ran)."""
        answers: list[str | None] = [None] * len(requests)
        by_task: dict[str | None, list[int]] = {}
        for i, request in enumerate(requests):
            request.arguments = (request.args[0], request_kwargs(request.args[1], self.flags, self.given))
            by_task.setdefault(request.task_name, []).append(i)
        for task, indices in by_task.items():
            for kwargs in {json.dumps(requests[i].args[1], sort_keys=True, default=str): requests[i].args[1]
                           for i in indices}.values():
                self._check_room(task, kwargs)
            self._task = task
            try:
                for i, answer in zip(indices, super().generate_until([requests[i] for i in indices], disable_tqdm)):
                    answers[i] = answer
            finally:
                self._task = None
        return answers

    def _check_room(self, task: str | None, kwargs: dict) -> None:
        """HFLM keeps max_gen_toks of the model's context for the answer: a budget that fills it is refused here,
        in one line, instead of by HFLM's assertion."""
        budget = normalize_gen_kwargs(kwargs, self.max_gen_toks)["max_gen_toks"]
        if budget >= self.max_length:
            what = f"--max_steps {budget}" if "max_steps" in self.given else f"task {task}: max_gen_toks {budget}"
            raise UsageError(f"{what} leaves no room for a prompt in the model's context of {self.max_length} tokens")

    def run_config(self, max_new_tokens: int, stop: list[str], kwargs: dict) -> GenerationConfig:
        """The configuration a batch of requests runs with: the flags that are no task's business, and the
        request's (normalised) generation_kwargs. A temperature of 0 decodes greedily, as in lm-eval."""
        temperature = _number(kwargs, "temperature", 0.0, float)
        sample = bool(kwargs.get("do_sample")) and temperature > 0
        try:
            return dataclasses.replace(
                self.generation,
                max_steps=max(max_new_tokens, 1),
                sample=sample,
                temperature=temperature if sample else 1.0,
                top_p=_number(kwargs, "top_p", 1.0, float),
                top_k=_number(kwargs, "top_k", 0, int),
                no_repeat_ngram_size=_number(kwargs, "no_repeat_ngram_size", 0, int),
                stop_words=list(stop),
            )
        except UsageError as error:  # a task's own value out of range
            raise UsageError(f"task {self._task}: {error}") from None

    def generator(self, config: GenerationConfig) -> Generator:
        key = json.dumps(dataclasses.asdict(config), sort_keys=True)
        if key not in self.generators:
            self.generators[key] = Generator(self.model, self.tokenizer, config, seed=self.seed)
        return self.generators[key]

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs) -> torch.Tensor:
        mask = kwargs.pop("attention_mask", None)  # (B, T): lm-eval pads a batch's contexts on the left
        config = self.run_config(max_length - context.shape[1], stop, kwargs)
        ran = self.ran.setdefault(self._task, [])
        if dataclasses.asdict(config) not in ran:
            ran.append(dataclasses.asdict(config))
        generator = self.generator(config)
        contexts = context.tolist()
        prompts = contexts if mask is None else [row[m.bool()].tolist() for row, m in zip(context, mask)]
        results = generator.generate_batch(prompts)
        self.speed.add(results)
        if self.generations is not None:
            path, run_id = self.generations
            for prompt, result in zip(prompts, results):
                append_jsonl(path, {"run_id": run_id, "task": self._task, "prompt": self.tokenizer.decode(prompt),
                                    "generation": self.tokenizer.decode(result.tokens),
                                    "stop_reason": result.stop_reason})
        rows = [row + result.tokens for row, result in zip(contexts, results)]  # lm-eval cuts the context width off
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=context.device)


def check_fewshot(task_manager, tasks: list[str], num_fewshot: int) -> None:
    """Refuse more few-shot examples than a task can draw (lm-eval stops with `random.sample`'s "Sample larger than
    population" and a traceback). A task whose few-shot examples come from the split it is evaluated on never shows
    a document as its own example, so it has one fewer; a task whose config fixes 0 keeps 0 (lm-eval's rule)."""
    for name, task in task_manager.load(tasks)["tasks"].items():
        if task.get_config("num_fewshot") == 0:
            continue
        docs = task.fewshot_docs()
        pool = 0 if docs is None else len(docs) if hasattr(docs, "__len__") else sum(1 for _ in docs)
        fewshot_split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
        own = fewshot_split is not None and fewshot_split == task.get_config("test_split")
        if num_fewshot > pool - own:
            besides = f", {pool - 1} besides the document asked about" if own else ""
            raise UsageError(f"--num_fewshot {num_fewshot}: the task {name} has {pool} few-shot examples{besides}")


def evaluate(lm: LayerSkipLM, task_manager, tasks: list[str], online: bool, **options) -> dict:
    """lm_eval.simple_evaluate, with what a user can fix said in one line: a hub-hosted task or metric offline, a
    task that runs generated code without permission, more few-shot examples than a task has."""
    try:
        if options.get("num_fewshot"):
            check_fewshot(task_manager, tasks, options["num_fewshot"])
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, **options)
    except (ConnectionError, OSError) as error:
        metric = re.search(r"Module '([\w-]+)' doesn't exist", str(error))
        if isinstance(error, FileNotFoundError) and not metric and not re.search(r"hf\.co|hugging ?face", str(error),
                                                                                  re.IGNORECASE):
            raise UsageError(f"--tasks {','.join(tasks)}: a data file of the task is missing "
                             f"({str(error).splitlines()[0]})") from None
        if online:
            raise
        if metric:  # the `evaluate` library fetches metric code (code_eval for humaneval) from the hub
            raise UsageError(f"--tasks {','.join(tasks)}: the metric {metric.group(1)} is loaded from the Hugging "
                             "Face hub by the evaluate library, and the hub is unreachable; run it where the hub is "
                             "reachable once (it is cached), or use a local task (see --include_path)") from None
        raise UsageError(f"--tasks {','.join(tasks)}: the task data is on the Hugging Face hub, which is "
                         f"unreachable; use a local task (see --include_path) ({str(error).splitlines()[0]})") from None
    except ValueError as error:
        if "unsafe" in str(error).lower() or "confirm_run_unsafe_code" in str(error):
            raise UsageError("this task executes generated code; pass --allow_code_execution to allow it") from None
        raise
