"""This toolkit's decoding inside Hugging Face's own API: `model.generate(..., custom_generate=layerskip_generate)`.

    from self_speculation.hf import layerskip_generate

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, custom_generate=layerskip_generate, max_new_tokens=64, do_sample=False,
                         exit_layer=8, num_speculations=6)  # a (B, T + new) tensor, as generate returns

The contract (transformers 5.23, generation/utils.py). With a callable, `generate` prepares its inputs as for its
own loop and then calls `custom_generate(model, input_ids, logits_processor=..., stopping_criteria=...,
generation_config=..., **model_kwargs)` (line 3007): the processors and criteria it built, the generation config
merged from the model's, the call's arguments and the library defaults, and the model keyword arguments
(`attention_mask`, None when it is all ones; `position_ids`; an empty `past_key_values`; `use_cache`; and
`logits_to_keep=1`, injected at line 2954). Arguments of the call that are no generation setting reach the
callable only when its signature names them and `_sample`'s does not (lines 2574-2578): here
`generation_strategy` (default self_speculative), `exit_layer` and `num_speculations` (default: the checkpoint's
recommendation, else a UsageError), `draft_policy`, `batch_drafts` and `compile` (default: the toolkit's),
`seed`, `stop_strings` and `stop_strings_tokenizer`. `tokenizer=` is popped at line 2560 and never reaches a
callable, and `streamer=` is a parameter of `generate` itself, passed to its own loops only (`_sample` names it,
so no signature can claim it); `generate` still shows the streamer the prompt (line 2937).

What this route does with them:
- the prompts: each row of `input_ids` without its left padding (`attention_mask`), decoded as one ragged batch by
  `Generator.generate_batch`. Other padding (right, or holes) is refused.
- mapped from generation_config: `max_new_tokens` / `max_length` (the budget is `max_length` minus the padded
  prompt's length, as generate counts it), `do_sample` (False: greedy, whatever temperature says), `temperature`,
  `top_k` (generate's default 50 included), `top_p`, `no_repeat_ngram_size` (over each row's own tokens;
  generate's rule also sees a row's padding, which tells only where the model generates the padding's id),
  `eos_token_id` (one or several: the only end-of-sequence ids, as in generate), `pad_token_id` (fills the rows
  that stop first; unset, the first EOS id, as generate does) and `return_dict_in_generate` (a
  `GenerateDecoderOnlyOutput` holding `sequences` only).
- stop strings: `stop_strings=` is claimed by this callable's signature, since generate would otherwise refuse it
  for want of the tokenizer it dropped; pass the tokenizer as `stop_strings_tokenizer=`. (The directory route,
  hf_custom_generate/, takes `tokenizer=` as usual.) A stop string ends a row when it appears in the text generated
  (not in the prompt), also inside one token; generate's `StopStringCriteria` matches across the prompt's end too,
  and misses a stop string that lies inside a token without reaching its start.
- `streamer=`: read from generate's own arguments (its frame: `_generate_arguments`), since generate keeps it from
  a callable. It gets the new tokens (a step's tokens at a time, not one by one) and `end()`; one prompt only.
- sampling draws with this toolkit's noise keyed by position (`sampling.race_noise`), from `seed=`, else from one
  `torch.randint` on torch's CPU generator, so that `torch.manual_seed` repeats a call and successive calls
  differ, as with generate's own sampling. The tokens are not generate's for the same seed; their distribution is.
- settings of Hugging Face's own loop (its cache and compilation: `use_cache`, `cache_implementation`,
  `compile_config`, ...) and settings that act only in modes refused here (beam and assistant settings) change
  nothing. Every other generation_config field set to something other than its default is refused with one
  UsageError naming it: beams, repetition penalties, `min_new_tokens`, `num_return_sequences`,
  `output_scores` / `output_logits` / attentions / hidden states, `max_time`, token healing, other warpers. So are
  logits processors and stopping criteria that are not the ones these fields make (`logits_processor=`,
  `stopping_criteria=`, `prefix_allowed_tokens_fn=`), `assistant_model=`, model keyword arguments other than the
  above (e.g. `inputs_embeds`), a `past_key_values` that holds tokens, `position_ids` other than generate's, and a
  prompt plus budget past the model's context (generate would run past it; this toolkit stops there).
- the rows of a batch that stop first are padded as generate pads them after an EOS id. Without an EOS id, generate
  does not pad a row that met a stop string but goes on generating for it; this route pads it with
  `pad_token_id`, and refuses stop strings in a batch with neither id.

Errors name generate's arguments (`exit_layer=`), where the scripts' name their flags (`--exit_layer`).

Generators are built once per model and settings and kept on the model (`Generators`), since building one times
the adaptive policy's passes and, with `compile=True`, compiles them again.
"""

import dataclasses
import inspect
import re
import sys
from typing import NoReturn

import torch
from transformers import (
    GenerationConfig as HFGenerationConfig,
    GenerationMixin,
    NoRepeatNGramLogitsProcessor,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from .config import GenerationConfig
from .errors import MAX_SEED, UsageError, check_seed
from .generator import Generator

# generation_config fields this route reads
MAPPED = frozenset({"max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                    "no_repeat_ngram_size", "eos_token_id", "pad_token_id", "stop_strings", "return_dict_in_generate"})
# fields that change nothing here: Hugging Face's own cache, compilation and prefill (this route has its own), the
# prompt's special tokens, encoder-decoder and beam settings, and assistant settings that act only with an
# assistant (`assistant_model`, `assistant_early_exit` and `prompt_lookup_num_tokens` are refused)
NO_EFFECT = frozenset({
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
    "prefill_chunk_size", "continuous_batching_config", "low_memory", "bos_token_id", "decoder_start_token_id",
    "transformers_version", "early_stopping", "length_penalty", "is_assistant", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
    "max_matching_ngram_size", "assistant_ensemble_weight",
})
# the processors generate makes from the mapped fields: their type -> (their attribute, the field it holds)
PROCESSORS = {
    TemperatureLogitsWarper: ("temperature", "temperature"),
    TopKLogitsWarper: ("top_k", "top_k"),
    TopPLogitsWarper: ("top_p", "top_p"),
    NoRepeatNGramLogitsProcessor: ("ngram_size", "no_repeat_ngram_size"),
}
# what generate passes as model keyword arguments for a plain prompt
MODEL_KWARGS = frozenset({"attention_mask", "position_ids", "past_key_values", "use_cache", "logits_to_keep"})
_GENERATE = inspect.unwrap(GenerationMixin.generate).__code__


def layerskip_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config: HFGenerationConfig,
    *,
    generation_strategy: str = "self_speculative",
    exit_layer: int | None = None,
    num_speculations: int | None = None,
    draft_policy: str | None = None,
    batch_drafts: bool | None = None,
    compile: bool | None = None,
    seed: int | None = None,
    stop_strings: str | list[str] | None = None,
    stop_strings_tokenizer=None,
    **model_kwargs,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """`generate`'s decoding by this toolkit's `Generator`: the module's docstring has the contract. Returns the
    padded prompts followed by the new tokens (B, T + N), the rows that stopped first padded, or with
    `return_dict_in_generate` a `GenerateDecoderOnlyOutput` holding them as `sequences`."""
    g = generation_config
    call = _generate_arguments()
    eos = _token_ids(g.eos_token_id)
    _check_supported(g, input_ids, logits_processor, stopping_criteria, model_kwargs, call, eos)
    prompts = _prompts(input_ids, model_kwargs.get("attention_mask"))
    budget = g.max_length - input_ids.shape[1]  # generate counts the padded prompt's length
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and max(map(len, prompts)) + budget > context:
        raise UsageError(f"a prompt of {max(map(len, prompts))} tokens and {budget} new ones run past the model's "
                         f"context of {context} positions; lower max_new_tokens")
    pad = g.pad_token_id if g.pad_token_id is not None else (eos[0] if eos else None)  # as generate pads
    stop_words = stop_strings if stop_strings is not None else g.stop_strings
    stop_words = [stop_words] if isinstance(stop_words, str) else list(stop_words or [])
    if stop_words and stop_strings_tokenizer is None:
        raise UsageError("stop_strings need the tokenizer, and transformers does not pass generate's tokenizer= on "
                         "to a custom_generate callable: pass it as stop_strings_tokenizer=")
    if stop_words and pad is None and len(prompts) > 1:
        raise UsageError("stop_strings in a batch need a pad_token_id or an eos_token_id to pad the rows that stop "
                         "first")
    chosen = {"generation_strategy": generation_strategy, "exit_layer": exit_layer,
              "num_speculations": num_speculations, "draft_policy": draft_policy, "batch_drafts": batch_drafts,
              "compile": compile}
    try:
        if seed is not None:
            check_seed(seed)
        config = GenerationConfig(
            **{name: value for name, value in chosen.items() if value is not None},
            sample=bool(g.do_sample), temperature=g.temperature, top_k=g.top_k or 0, top_p=g.top_p,
            no_repeat_ngram_size=g.no_repeat_ngram_size or 0, stop_words=stop_words,
        )
        generator = Generators.of(model).get(config, set(eos), stop_strings_tokenizer if stop_words else None)
    except UsageError as error:  # the toolkit names its flags (--exit_layer); here they are generate's arguments
        raise UsageError(re.sub(r"--(\w+)", r"\1=", str(error))) from None
    if config.sample:
        # one draw from torch's CPU generator: torch.manual_seed repeats a call, and calls differ, as in generate
        generator.seed = seed if seed is not None else int(torch.randint(MAX_SEED + 1, ()))
        generator.drawn = 0  # a call's rows draw streams 0..B-1 of its seed, whatever came before
    results = generator.generate_batch(prompts, streamer=call.get("streamer"), max_steps=budget)
    sequences = _sequences(input_ids, [r.tokens for r in results], pad)
    return GenerateDecoderOnlyOutput(sequences=sequences) if g.return_dict_in_generate else sequences


def _generate_arguments() -> dict:
    """The arguments of the `generate` call that called `layerskip_generate`, read from its frame (two calls up:
    generate calls the callable itself, generation/utils.py:3007), for what it does not pass on (`streamer`,
    `assistant_model`). Empty when `layerskip_generate` was called otherwise."""
    frame = sys._getframe(2)
    return frame.f_locals if frame.f_code is _GENERATE else {}


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return [value] if isinstance(value, int) else list(value)


def _refuse(what: str) -> NoReturn:
    raise UsageError(f"custom_generate=layerskip_generate does not support {what}")


def _check_supported(g: HFGenerationConfig, input_ids: torch.Tensor, logits_processor, stopping_criteria,
                     model_kwargs: dict, call: dict, eos: list[int]) -> None:
    """Refuse, with one UsageError naming it, anything set for this call that this route would not do as
    generate does."""
    defaults = HFGenerationConfig._get_default_generation_params()
    refused = []
    for name in vars(HFGenerationConfig()):
        value = getattr(g, name, None)
        unset = value is None or value is False or value == defaults.get(name)  # a flag left False is unset
        if not (unset or name.startswith("_") or name in MAPPED | NO_EFFECT):
            refused.append(f"{name}={value!r}")
    if refused:
        _refuse(", ".join(refused))
    if call.get("assistant_model") is not None:
        _refuse("assistant_model= (it drafts with the model's own early exit)")
    for processor in logits_processor or ():
        attribute, field = PROCESSORS.get(type(processor), (None, None))
        if attribute is None or getattr(processor, attribute) != getattr(g, field):
            _refuse(f"the logits processor {type(processor).__name__} (from logits_processor=, "
                    "prefix_allowed_tokens_fn= or a generation setting)")
    for criterion in stopping_criteria or ():
        if type(criterion) is MaxLengthCriteria and criterion.max_length == g.max_length:
            continue
        if type(criterion) is EosTokenCriteria and set(criterion.eos_token_id.tolist()) == set(eos):
            continue
        _refuse(f"the stopping criterion {type(criterion).__name__} (from stopping_criteria= or a generation "
                "setting)")
    if unknown := sorted(set(model_kwargs) - MODEL_KWARGS):
        _refuse(f"the model keyword argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    cache = model_kwargs.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        _refuse("a past_key_values holding tokens (it keeps its own cache: pass the whole prompt)")
    positions, mask = model_kwargs.get("position_ids"), model_kwargs.get("attention_mask")
    if positions is not None:
        mask = torch.ones_like(input_ids) if mask is None else mask
        expected = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T), as generate numbers them
        if positions.shape[-1] != expected.shape[-1] or not torch.equal(positions.expand_as(expected), expected):
            _refuse("position_ids other than generate's (each prompt numbered from its first token)")


def _prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's tokens without its left padding."""
    rows = input_ids.tolist()
    if attention_mask is None:
        return rows
    prompts = []
    for b, (row, mask) in enumerate(zip(rows, attention_mask.tolist())):
        start = next((i for i, kept in enumerate(mask) if kept), len(mask))
        if start == len(mask):
            raise UsageError(f"attention_mask: row {b} is all padding")
        if not all(mask[start:]):
            raise UsageError(f"attention_mask: row {b} is not left-padded (zeros, then ones); layerskip_generate "
                             "takes left-padded prompts (the tokenizer's padding_side='left')")
        prompts.append(row[start:])
    return prompts


def _sequences(input_ids: torch.Tensor, generated: list[list[int]], pad: int | None) -> torch.Tensor:
    """The prompts (B, T) followed by each row's new tokens, padded with `pad` to the longest: (B, T + N)."""
    width = max(map(len, generated))
    rows = [tokens + [pad] * (width - len(tokens)) for tokens in generated]
    return torch.cat([input_ids, torch.tensor(rows, dtype=input_ids.dtype, device=input_ids.device)], dim=1)


class Generators:
    """The generators this route built for one model, kept on it (`of`), by their settings, so that a call reuses
    what an earlier one derived: the adaptive policy's timed passes, compiled passes. The most recent LIMIT are
    kept. A copy or a pickle of the model starts with none: they are derived from the model."""

    LIMIT = 8

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.built: dict[tuple, Generator] = {}

    @classmethod
    def of(cls, model: PreTrainedModel) -> "Generators":
        held = model.__dict__.get("_layerskip_generators")
        if held is None or held.model is not model:
            held = model.__dict__["_layerskip_generators"] = cls(model)
        return held

    def get(self, config: GenerationConfig, eos: set[int], tokenizer) -> Generator:
        """The generator of these settings (the budget is each call's own), built on first use. The tokenizer is
        named by its id: the generator holding it keeps that id from being reused."""
        parameter = next(self.model.parameters())
        key = (tuple(tuple(v) if isinstance(v, list) else v for v in dataclasses.astuple(config)),
               tuple(sorted(eos)), id(tokenizer), parameter.device, parameter.dtype)
        generator = self.built.pop(key, None) or Generator(self.model, tokenizer, config, eos_token_ids=eos)
        self.built[key] = generator  # the most recently used last
        while len(self.built) > self.LIMIT:
            del self.built[next(iter(self.built))]
        return generator

    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return type(None), ()
