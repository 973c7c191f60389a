"""Command-line arguments of every script, defined once as dataclasses (help text, choices, validation)."""

import argparse
import difflib
import itertools
import sys
from argparse import ArgumentTypeError
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from data import DATASETS, DataOptions, Example, load_examples
from self_speculation.benchmarking import Batch, batches
from self_speculation.config import DRAFT_POLICIES, GenerationConfig
from self_speculation.errors import UsageError, check_range, check_seed, check_text
from self_speculation.loading import DEFAULT_MODEL, load
from self_speculation.strategies import STRATEGIES
from self_speculation.streamers import STREAMERS

MAX_WARMUP = 100  # warm-up runs the first batch; past a few runs it only delays the measurement

__all__ = ["MAX_WARMUP", "SAMPLING", "BatchArguments", "DataArguments", "GenerateArguments", "GenerationArguments", "ModelArguments", "given_flags", "parse", "pop_list", "pop_variants", "run", "warn_ignored",
           "warn_unused"]


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's ways of spreading a model


@dataclass
class ModelArguments:
    model: str = field(
        default=str(DEFAULT_MODEL),
        metadata={"help": "Hugging Face hub id or local directory of the model (default: the embedded model, "
                          "models/layerskip-stdlib)"},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "weights dtype; auto is bfloat16 on GPUs (float16 where bfloat16 is unsupported), float32 on CPU",
            "choices": ("auto", "float32", "bfloat16", "float16"),
        },
    )
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu, cuda, cuda:N or mps"})
    device_map: str | None = field(
        default=None, metadata={"help": "spread the model over several GPUs, e.g. auto (needs accelerate)"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "run model code shipped with the checkpoint"})
    seed: int = field(default=42, metadata={"help": "random seed for sampling"})
    output_dir: str = field(default="./logs", metadata={"help": "directory for result files"})

    def __post_init__(self):
        check_seed(self.seed)
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            try:
                torch.device(self.device_map)  # one device for the whole model, as accelerate takes it
            except RuntimeError:
                raise UsageError(f"--device_map must be one of {', '.join(DEVICE_MAPS)} or a device such as cuda:0 "
                                 f"(got {self.device_map!r})") from None

    def load(self):
        """The model (eval mode, on its device) and its tokenizer."""
        return load(self.model, self.dtype, self.device, self.device_map, self.trust_remote_code)


_STRATEGY = next(f for f in fields(GenerationConfig) if f.name == "generation_strategy")


@dataclass
class GenerationArguments(GenerationConfig):
    """The generation flags: GenerationConfig, with the strategy table's names as the choices of its strategy."""

    generation_strategy: str = field(default=_STRATEGY.default,
                                     metadata=dict(_STRATEGY.metadata) | {"choices": tuple(STRATEGIES)})


@dataclass
class GenerateArguments:
    prompt: str | None = field(
        default=None, metadata={"help": "generate once for this prompt instead of reading prompts interactively"}
    )
    streamer: str = field(
        default="standard",
        metadata={
            "help": "none, standard (text as it is generated) or speculative (drafts in colour, erased when rejected)",
            "choices": tuple(STREAMERS),
        },
    )

    def __post_init__(self):
        if self.prompt is not None:
            check_text(self.prompt, "--prompt")


@dataclass
class DataArguments:
    dataset: str = field(default="human_eval", metadata={"help": "where the prompts come from", "choices": tuple(DATASETS)})
    data_path: str | None = field(
        default=None,
        metadata={"help": "local file for the dataset: JSONL/JSON/parquet/CSV with the dataset's own field names "
                          "(needed offline for the hub datasets, and for custom_jsonl and chat_format)"},
    )
    num_samples: int = field(default=-1, metadata={"help": "use only the first N examples (-1: all)"})
    random_shuffle: bool = field(default=False, metadata={"help": "shuffle the examples first (seeded by --seed)"})
    n_shot: int = field(default=0, metadata={"help": "solved examples shown before each prompt (summarization, top_v2)"})
    template: str | None = field(default=None, metadata={"help": "prompt template containing {message}"})
    prompt_field: str = field(default="prompt", metadata={"help": "prompt field of custom_jsonl"})
    response_field: str = field(default="response", metadata={"help": "reference field of custom_jsonl"})

    def __post_init__(self):
        if self.num_samples == 0 or self.num_samples < -1:
            raise UsageError(f"--num_samples must be >= 1, or -1 for all (got {self.num_samples})")
        check_range("--n_shot", self.n_shot, 0)
        if self.template is not None:
            check_text(self.template, "--template")

    def load(self, seed: int) -> list[Example]:
        options = DataOptions(self.data_path, self.n_shot, self.prompt_field, self.response_field, seed)
        return load_examples(self.dataset, options, self.num_samples, self.random_shuffle, self.template)


@dataclass
class BatchArguments:
    batch_size: int = field(default=1, metadata={
        "help": "prompts decoded together (tokens/s is then all rows' tokens over the batch's wall time); each row "
                "gets what it gets alone"})

    def __post_init__(self):
        if self.batch_size < 1:
            raise UsageError(f"--batch_size must be >= 1 (got {self.batch_size})")

    def settings(self) -> dict:
        return {"batch_size": self.batch_size}


@dataclass
class DatasetBatchArguments(BatchArguments):
    """--batch_size for a script that batches a dataset's prompts itself (eval.py leaves that to lm-eval)."""

    group_by_length: bool = field(default=True, metadata={
        "help": "batch prompts of similar lengths together, so that rows carry little padding (with --batch_size > 1; "
                "records keep each example's id)"})

    def settings(self) -> dict:
        return super().settings() | ({"group_by_length": self.group_by_length} if self.batch_size > 1 else {})

    def batches(self, prompts: list[list[int]]) -> list[Batch]:
        return batches(prompts, self.batch_size, self.group_by_length)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The default after each flag's help, unless the help says it already (the embedded model's path is this
    machine's, not something to show)."""

    def _get_help_string(self, action):
        return action.help if "(default: " in (action.help or "") else super()._get_help_string(action)


class _Parser(HfArgumentParser):
    def __init__(self, types: tuple[type, ...]):
        super().__init__(types, allow_abbrev=False, formatter_class=_Formatter)  # a prefix of a flag is a typo
        for action in self._actions:  # transformers gives --no_X its --X's help, which then reads as its opposite
            negative = next((s for s in action.option_strings if s.startswith("--no_")), None)
            if negative is not None and f"--{negative[5:]}" in self._option_string_actions:
                action.help, action.default = f"the same as --{negative[5:]} False", argparse.SUPPRESS

    def error(self, message: str):
        raise UsageError(message)

    def unknown(self, argument: str) -> str:
        """The message for an argument no dataclass declares, with the closest real flag."""
        if not argument.startswith("-"):
            return f"unexpected argument {argument} (every value follows its flag, as in --prompt TEXT)"
        flag = argument.split("=", 1)[0]
        closest = difflib.get_close_matches(flag, [f for f in self._option_string_actions if f.startswith("--")], n=1)
        return f"unknown flag {flag}" + (f" (did you mean {closest[0]}?)" if closest else "; see --help")


def description(doc: str) -> str:
    """What a script's --help opens with, from its docstring: what it does (the first paragraph) and its first
    example command (with the lines it continues onto)."""
    first = doc.strip().split("\n\n")[0]
    example = next(line for line in doc.splitlines() if line.lstrip().startswith("python "))
    return f"{' '.join(first.split())}\n\nexample:\n  {' '.join(example.split())}"  # a docstring's \ joined its lines


def parse(types: tuple[type, ...], argv: list[str] | None = None, help: dict[str, str] | None = None,
          doc: str | None = None) -> tuple:
    """Parse argv (default: sys.argv[1:]) into one instance of each dataclass; bad input raises UsageError.
    `help` replaces the help text of flags a script reads differently (and drops their listed choices): text, or
    (text, metavar); the metavar is NAMES unless given (None: the flag's own). `doc`: the script's docstring, which --help opens with
    (`description`)."""
    parser = _Parser(types)
    if doc is not None:
        parser.description = description(doc)
    for flag, text in (help or {}).items():
        action = parser._option_string_actions[flag]
        text, metavar = (text, "NAMES") if isinstance(text, str) else text
        action.help, action.choices, action.metavar = text, None, metavar or action.metavar
    _, unknown = parser.parse_known_args(args=argv)
    if unknown:
        raise UsageError(parser.unknown(unknown[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def given_flags(argv: list[str] | None = None) -> set[str]:
    """The flags the command line sets (their underscore spelling, without the dashes), for a script that lets a
    flag the user gave win over a default from elsewhere (eval.py over a task's generation settings)."""
    argv = sys.argv[1:] if argv is None else argv
    return {item[2:].split("=", 1)[0].replace("-", "_") for item in argv if item.startswith("--")}


def warn_ignored(argv: list[str] | None, names: tuple[str, ...], reason: str) -> None:
    """One warning line for the flags among `names` that the command line gave and the script will not use."""
    ignored = [f"--{name}" for name in names if name in given_flags(argv)]
    if ignored:
        print(f"warning: {', '.join(ignored)} ignored: {reason}", file=sys.stderr)


SAMPLING = ("temperature", "top_k", "top_p")


def warn_unused(argv: list[str] | None, readers: dict[str, frozenset[str]], batch_size: int) -> None:
    """"Accepted means used, or one warning line" for the flags whose use depends on what a script runs: a
    strategy flag (`STRATEGY_FLAGS`) that none of the strategies it runs reads (`readers`: each one's flags), and a
    flag of batches (--batch_drafts, --group_by_length) at --batch_size 1."""
    from self_speculation.strategies import STRATEGY_FLAGS

    given = given_flags(argv)
    spelled = {flag: {flag, "no_" + flag} & given for flag in STRATEGY_FLAGS + ("group_by_length",)}
    unread = [flag for flag in STRATEGY_FLAGS if spelled[flag] and not any(flag in r for r in readers.values())]
    if unread:
        names = ", ".join(f"--{flag}" for flag in unread)
        print(f"warning: {names} ignored: {', '.join(readers)} {'does' if len(readers) == 1 else 'do'} not use "
              f"{'it' if len(unread) == 1 else 'them'}", file=sys.stderr)
    batch_only = [f"--{name}" for flag in ("batch_drafts", "group_by_length") if flag not in unread
                  for name in sorted(spelled[flag])]
    if batch_size == 1 and batch_only:
        print(f"warning: {', '.join(batch_only)} ignored: one prompt at a time (--batch_size 1)", file=sys.stderr)


def pop_list(argv: list[str], flag: str, default: str) -> list[str]:
    """Remove every `flag VALUE` (or `flag=VALUE`) from argv and return the comma-separated names they hold, in
    order, each once: for a flag a script reads differently from the shared dataclasses (benchmark.py's
    --generation_strategy a,b, also given as --generation_strategy a --generation_strategy b). Its dashed spelling
    (--generation-strategy) is the same flag, as for every other flag."""
    spellings = (flag, "--" + flag[2:].replace("_", "-"))
    values, i = [], 0
    while i < len(argv):
        item = argv[i]
        if item in spellings:
            if i + 1 >= len(argv):
                raise UsageError(f"{flag} needs a value")
            values.append(argv[i + 1])
            del argv[i : i + 2]
        elif item.startswith(tuple(spelling + "=" for spelling in spellings)):
            values.append(item.split("=", 1)[1])
            del argv[i]
        else:
            i += 1
    names = [name for value in values or [default] for name in value.split(",")]
    if "" in names:
        raise UsageError(f"{flag}: an empty name in {','.join(values)!r}")
    return list(dict.fromkeys(names))


COMPILED = "+compiled"


def pop_compile_both(argv: list[str]) -> bool:
    """Remove `--compile both` (or `--compile=both`) from argv: True where it was given. A value that is neither
    a boolean nor `both` is refused here, where all three choices can be named; a bare `--compile` is True."""
    for i, item in enumerate(argv):
        if item == "--compile":
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                continue  # a bare --compile: True
            value, width = argv[i + 1], 2
        elif item.startswith("--compile="):
            value, width = item.partition("=")[2], 1
        else:
            continue
        if value == "both":
            del argv[i : i + width]
            if "compile" in given_flags(argv):
                raise UsageError("--compile is given twice")
            return True
        try:
            string_to_bool(value)
        except ArgumentTypeError:
            raise UsageError(f"--compile must be True, False or both (got {value!r})") from None
    return False


def pop_policies(argv: list[str], default: str = "static") -> list[str]:
    """Remove every --draft_policy from argv and return the policies named, comma-separated (`pop_list`),
    refusing one that does not exist."""
    policies = pop_list(argv, "--draft_policy", default)
    if unknown := [p for p in policies if p not in DRAFT_POLICIES]:
        raise UsageError(f"--draft_policy: unknown {', '.join(unknown)} (choose from {', '.join(DRAFT_POLICIES)})")
    return policies


def pop_variants(argv: list[str]) -> list[tuple[tuple[str, str, object], ...]]:
    """The variants a benchmark runs of each strategy, interleaved batch by batch, as rows NAME+SUFFIX: `--compile
    both` gives eager and +compiled, `--draft_policy a,b` gives +a and +b, and together every pair. Each variant
    is a tuple of (suffix part, flag, value) per axis; both flags leave argv (one policy stays, for the parser)."""
    axes = [(("", "compile", False), (COMPILED, "compile", True))] if pop_compile_both(argv) else []
    if "draft_policy" in given_flags(argv):
        policies = pop_policies(argv)
        if len(policies) == 1:
            argv += ["--draft_policy", policies[0]]
        else:
            axes.append(tuple((f"+{p}", "draft_policy", p) for p in policies))
    return list(itertools.product(*axes))


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a script's main: a UsageError becomes one line on stderr and exit status 2, ctrl-c status 130."""
    try:
        return main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
