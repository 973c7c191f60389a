"""Interactive generation: type a prompt, end it with ctrl-d, watch the completion and its speed.

    python generate.py --model DIR --generation_strategy self_speculative --exit_layer 8 --num_speculations 6
    python generate.py --model DIR --prompt "def fibonacci(n):" --sample False
"""

import sys

from arguments import (SAMPLING, GenerateArguments, GenerationArguments, ModelArguments, parse, run, warn_ignored,
                       warn_unused)
from self_speculation import Generator, UsageError
from self_speculation.distributed import rank
from self_speculation.streamers import STREAMERS

INSTRUCTIONS = ("Enter a prompt, then ctrl-d (ctrl-d on an empty prompt quits; ctrl-c clears the prompt, or stops a "
                "generation):")


def generate_once(generator: Generator, prompt: str, streamer_name: str) -> None:
    streamer = STREAMERS[streamer_name](generator.tokenizer, skip_special_tokens=True)
    result = generator.generate(prompt, streamer)
    if streamer is None:
        print(result.text)
    print(result.report())


def interactive(generator: Generator, streamer_name: str) -> None:
    """Prompts until ctrl-d on an empty one; a prompt that cannot be generated from (empty, too long for the
    model, not UTF-8) is named in one line and the next prompt is asked for."""
    while True:
        print(INSTRUCTIONS, flush=True)
        try:
            prompt = sys.stdin.read()
        except KeyboardInterrupt:  # as in a shell: the typed text is dropped and a new prompt begins
            print()
            continue
        except UnicodeDecodeError as error:
            print(f"error: the prompt is not UTF-8 text (byte 0x{error.object[error.start]:02x})", file=sys.stderr)
            continue
        if not prompt:
            return
        if not prompt.strip():
            print("error: the prompt is empty", file=sys.stderr)
            continue
        # ctrl-d after text ends the prompt without a newline, leaving the cursor on its line
        print(("" if prompt.endswith("\n") else "\n") + "-" * 40)
        try:
            generate_once(generator, prompt, streamer_name)
        except KeyboardInterrupt:
            print("\n[generation interrupted]")
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)


ARGUMENTS = (ModelArguments, GenerationArguments, GenerateArguments)


def main(argv: list[str] | None = None) -> int:
    model_args, config, args = parse(ARGUMENTS, argv, doc=__doc__)
    if rank() != 0:
        return 0  # under torchrun only the first process talks to the terminal
    if not config.sample:
        warn_ignored(argv, SAMPLING, "greedy decoding (--sample False)")
    warn_ignored(argv, ("output_dir",), "generate.py prints what it generates and writes no file")
    model, tokenizer = model_args.load()
    generator = Generator(model, tokenizer, config, seed=model_args.seed)
    warn_unused(argv, {generator.strategy.name: generator.strategy.flags}, 1)  # after the hand-over to early_exit
    if config.compile:
        print("--compile: the first generation compiles the decoding passes (about half a minute each); its time "
              "includes that", file=sys.stderr)
    if args.prompt is not None:
        generate_once(generator, args.prompt, args.streamer)
    else:
        interactive(generator, args.streamer)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
