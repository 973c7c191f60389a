"""lm-evaluation-harness model `layerskip`: Hugging Face's HFLM with two hooks replaced.

- `_model_generate` (generate_until) runs our generator with the chosen strategy, honouring each request's
  `until`, `max_gen_toks`, `do_sample` and `temperature`, and collects speed figures.
- `_model_call` (loglikelihood, loglikelihood_rolling) scores with the early exit when the strategy is
  autoregressive and an exit layer is set; otherwise with the full model. Self-speculative decoding is lossless,
  so it cannot change log-likelihood scores: those always come from the full model.
"""

import dataclasses
import json
import re

import lm_eval
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import layers
from .config import GenerationConfig
from .generator import Generator
from .errors import UsageError
from .loading import load
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


@register_model("layerskip")
class LayerSkipLM(HFLM):
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
        **kwargs,
    ):
        if isinstance(pretrained, str):
            pretrained, loaded_tokenizer = load(pretrained, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer
        config = GenerationConfig(
            generation_strategy=generation_strategy, exit_layer=int(exit_layer),
            num_speculations=int(num_speculations), sample=False,
        )
        # checked once, with the checkpoint's defaults
        self.strategy, self.generation = configured(config, pretrained.config)
        self.seed = int(seed)
        self.speed = SpeedTotals()
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
            "speed": self.speed.summary(),
        }, default=str))

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

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs) -> torch.Tensor:
        mask = kwargs.pop("attention_mask", None)  # (B, T): lm-eval pads a batch's contexts on the left
        temperature = float(kwargs.get("temperature") or 0.0)
        sample = bool(kwargs.get("do_sample")) and temperature > 0
        config = dataclasses.replace(
            self.generation,
            max_steps=max(max_length - context.shape[1], 1),
            sample=sample,
            temperature=temperature if sample else 1.0,
            top_p=float(kwargs.get("top_p") or 1.0),
            top_k=int(kwargs.get("top_k") or 0),
            stop_words=list(stop),
        )
        generator = Generator(self.model, self.tokenizer, config, seed=self.seed)
        contexts = context.tolist()
        prompts = contexts if mask is None else [row[m.bool()].tolist() for row, m in zip(context, mask)]
        results = generator.generate_batch(prompts) if len(prompts) > 1 else [generator.generate_ids(prompts[0])]
        self.speed.add(results)
        rows = [row + result.tokens for row, result in zip(contexts, results)]  # lm-eval cuts the context width off
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=context.device)


def evaluate(lm: LayerSkipLM, task_manager, tasks: list[str], online: bool, **options) -> dict:
    """lm_eval.simple_evaluate, with what a user can fix said in one line: a hub-hosted task or metric offline, a
    task that runs generated code without permission."""
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, **options)
    except (ConnectionError, OSError) as error:
        if online:
            raise
        metric = re.search(r"Module '([\w-]+)' doesn't exist", str(error))
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
