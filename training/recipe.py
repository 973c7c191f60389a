"""The LayerSkip training recipe: layer dropout and the early-exit loss (Elhoushi et al., 2024, section 4.1).

- Layer dropout: layer l of L is skipped, per sample, with probability p(l, t) = S(t) · D(l) · p_max, where
  D(l) = exp(l · ln2 / (L − 1)) − 1 grows from 0 (first layer) to 1 (last) and S(t) is 1 (continued training) or
  the exponential ramp exp(t · ln2 / T) − 1 from 0 to 1 (training from scratch).
- Early-exit loss: the output of every enabled layer goes through the model's own final norm and LM head; the
  per-layer cross-entropies are mixed with normalised weights ẽ(l) = e_scale · Σ_{i≤l} i for l < L − 1 and
  ẽ(L − 1) = L − 1 + e_scale · Σ_{i≤L−2} i for the last layer, which is always enabled. These weights grow with
  depth, so a shallow exit gets a small share of the loss; the `uniform` weighting (this project's option) gives
  every enabled exit e_scale and the last layer 1 instead, for a model whose drafts come from a shallow exit.
- Curriculum (which layers are enabled at step t): rotational (every R-th layer, shifted by one each step) or
  gradual (from the last layer down to the first, one more every T / L steps); none gives the last layer only.
- Self-distillation (this project's option, not in the paper): an exit's loss becomes
  (1 − α) · CE(exit, next token) + α · τ² · KL(p_last,τ ‖ p_exit,τ), where p_·,τ = softmax(logits / τ) and the last
  layer's distribution is detached (a teacher, not a target that moves toward the exit). Greedy acceptance is the
  exit's argmax agreeing with the last layer's, so this is the loss that aims at it; τ² keeps the gradient's
  scale independent of τ (Hinton et al., 2015). The last layer keeps its plain cross-entropy.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from self_speculation import layers

CURRICULA = ("rotational", "gradual", "none")
EXIT_WEIGHTINGS = ("depth", "uniform")
RAMPS = ("constant", "exponential")


@dataclass(frozen=True)
class Distillation:
    weight: float  # α: the KL term's share of an exit's loss, in [0, 1]
    temperature: float = 1.0  # τ


def ramp_scale(ramp: str, step: int, total_steps: int) -> float:
    """S(t)."""
    if ramp == "constant":
        return 1.0
    return math.exp(min(step, total_steps) * math.log(2) / max(total_steps, 1)) - 1


def dropout_rates(num_layers: int, p_max: float, scale: float = 1.0) -> torch.Tensor:
    """p(l) for every layer (L,): 0 for the first layer, scale · p_max for the last."""
    depth = torch.arange(num_layers, dtype=torch.float64)
    d = torch.exp(depth * math.log(2) / max(num_layers - 1, 1)) - 1
    return (scale * p_max * d).float()


def early_exit_layers(curriculum: str, num_layers: int, step: int, total_steps: int, rotation: int) -> torch.Tensor:
    """Which layers get the early-exit loss at this step (L,) bool; the last layer always does."""
    depth = torch.arange(num_layers)
    if curriculum == "rotational":
        enabled = (depth + step) % rotation == 0
    elif curriculum == "gradual":
        per_layer = max(total_steps, 1) / num_layers
        enabled = depth >= num_layers - 1 - int(step // per_layer)
    else:
        enabled = torch.zeros(num_layers, dtype=torch.bool)
    enabled[-1] = True
    return enabled


def early_exit_weights(enabled: torch.Tensor, e_scale: float, weighting: str = "depth") -> torch.Tensor:
    """Normalised loss weights (L,); zero where a layer is not enabled. By depth (the paper's), the first layer's
    weight is zero too: its Σ_{i<=0} i is 0 (its output is one layer away from the embeddings)."""
    num_layers = enabled.numel()
    depth = torch.arange(num_layers, dtype=torch.float64)
    if weighting == "uniform":
        weights = torch.full((num_layers,), e_scale, dtype=torch.float64)
        weights[-1] = 1.0
    else:
        weights = e_scale * depth * (depth + 1) / 2  # e_scale · Σ_{i<=l} i
        weights[-1] = (num_layers - 1) + e_scale * (num_layers - 2) * (num_layers - 1) / 2
    weights = weights * enabled
    return (weights / weights.sum()).float()


@dataclass
class RecipeOutput:
    loss: torch.Tensor  # the weighted early-exit loss to back-propagate
    layer_losses: torch.Tensor  # (L,) cross-entropy at each layer's exit; NaN where not computed
    kept: torch.Tensor  # (L, B) bool: which samples ran each layer
    agreement: torch.Tensor  # (L,) share of positions where the exit's argmax is the last layer's; NaN where not computed


def draw_kept(rates: torch.Tensor, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(L, B) bool: which samples run each layer, layer l kept with probability 1 - rates[l]."""
    return torch.rand(len(rates), batch, generator=generator, device=rates.device) >= rates[:, None]


def recipe_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    rates: torch.Tensor,
    weights: torch.Tensor,
    generator: torch.Generator | None = None,
    distillation: Distillation | None = None,
    kept: torch.Tensor | None = None,
    rows: slice | None = None,
    run_layer: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> RecipeOutput:
    """Next-token loss of `input_ids` (B, T) with per-sample layer dropout at `rates` (L,) and the early-exit loss
    at the layers where `weights` (L,) is non-zero, each exit's loss mixed with the KL from the last layer when
    `distillation` is given. With `weights` None (evaluation) every layer's loss is reported and `loss` is the
    last layer's. `kept` (L, B), when given, says which samples run each layer instead of drawing it here (a
    process of several takes its rows of the draw for the whole batch).

    With `rows`, `kept` is the draw for a whole batch of which `input_ids` are the rows `rows`: a layer then runs
    when any sample of the whole batch runs it, the test one process makes, so that every process runs the same
    layers (a sharded model gathers a layer's weights on all processes at once); rows that skip it keep their
    input, and give its weights zero gradient. `run_layer(hidden, i)` runs layer i (by default
    `layers.run_layers`; a sharded model runs it through its shard)."""
    num_layers = layers.num_layers(model)
    batch = input_ids.shape[0]
    targets = input_ids[:, 1:].reshape(-1)
    hidden = layers.embed(model, input_ids)  # (B, T, H)
    if kept is None:
        kept = draw_kept(rates, batch, generator)
    mine = kept if rows is None else kept[:, rows]  # (L, B): this batch's rows
    # which layers run, for which rows, and which exits are scored: decided once, where the draw and the weights
    # were made (the host, in training); tested layer by layer on a GPU, each would be a sync
    runs, whole = kept.any(dim=1).tolist(), mine.all(dim=1).tolist()
    scored = [True] * num_layers if weights is None else (weights > 0).tolist()
    scored[-1] = True  # the last layer: the teacher, always
    mine = mine.to(hidden.device, non_blocking=True)
    if run_layer is None:
        run_layer = lambda h, i: layers.run_layers(model, h, None, i, i + 1)  # noqa: E731
    exits: dict[int, torch.Tensor] = {}  # layer -> logits (B * (T-1), V)
    for i in range(num_layers):
        if runs[i]:
            out = run_layer(hidden, i)
            hidden = out if whole[i] else torch.where(mine[i][:, None, None], out, hidden)
        if scored[i]:
            exits[i] = layers.head(model, hidden[:, :-1]).flatten(0, 1)
    last = exits[num_layers - 1]
    layer_losses = torch.full((num_layers,), float("nan"), device=last.device)
    agreement = torch.full((num_layers,), float("nan"), device=last.device)
    loss = last.new_zeros(())
    with torch.no_grad():
        final_choice = last.argmax(dim=-1)
        if distillation is not None:
            teacher = F.softmax(last / distillation.temperature, dim=-1)  # (N, V), shared by every exit
            teacher_entropy = -(teacher * torch.log(teacher.clamp_min(1e-30))).sum(-1).mean()
    for i, logits in exits.items():
        log_probs = F.log_softmax(logits, dim=-1)  # (N, V)
        layer_loss = F.nll_loss(log_probs, targets)
        layer_losses[i] = layer_loss.detach()
        agreement[i] = (logits.detach().argmax(dim=-1) == final_choice).float().mean()
        if weights is None:
            continue
        if distillation is not None and i < num_layers - 1:
            tau = distillation.temperature
            student = log_probs if tau == 1 else F.log_softmax(logits / tau, dim=-1)
            # KL(teacher ‖ student) = cross-entropy to the teacher − the teacher's entropy (a constant)
            kl = -(teacher * student).sum(-1).mean() - teacher_entropy
            layer_loss = (1 - distillation.weight) * layer_loss + distillation.weight * tau ** 2 * kl
        loss = loss + weights[i] * layer_loss
    if weights is None:
        loss = layer_losses[-1]
    return RecipeOutput(loss, layer_losses, mine, agreement)
