"""The LayerSkip training recipe: schedules, loss weights, and layer dropout statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from models import tiny_llama
from training.recipe import (
    Distillation,
    dropout_rates,
    early_exit_layers,
    early_exit_weights,
    ramp_scale,
    recipe_forward,
)


def test_dropout_rates_grow_exponentially_from_zero_to_p_max():
    rates = dropout_rates(8, p_max=0.2)
    assert rates[0] == 0 and math.isclose(rates[-1].item(), 0.2, rel_tol=1e-6)
    assert (rates.diff() > 0).all()
    expected = [0.2 * (2 ** (l / 7) - 1) for l in range(8)]
    torch.testing.assert_close(rates, torch.tensor(expected))
    torch.testing.assert_close(dropout_rates(8, 0.2, scale=0.5), rates / 2)


def test_ramp():
    assert ramp_scale("constant", 0, 100) == 1.0
    values = [ramp_scale("exponential", t, 100) for t in range(0, 101, 10)]
    assert values[0] == 0 and math.isclose(values[-1], 1.0) and values == sorted(values)
    assert math.isclose(ramp_scale("exponential", 50, 100), math.sqrt(2) - 1)


def test_rotational_curriculum_enables_every_rth_layer_in_turn():
    rotation, num_layers = 3, 7
    masks = torch.stack([early_exit_layers("rotational", num_layers, t, 100, rotation) for t in range(rotation)])
    assert masks[:, -1].all()
    assert (masks[:, :-1].sum(dim=0) == 1).all()  # over R steps, each other layer exactly once
    assert masks[0, :-1].nonzero().flatten().tolist() == [0, 3]


def test_gradual_curriculum_goes_from_the_last_layer_down():
    first = early_exit_layers("gradual", 4, 0, 100, 1)
    middle = early_exit_layers("gradual", 4, 50, 100, 1)
    last = early_exit_layers("gradual", 4, 99, 100, 1)
    assert first.tolist() == [False, False, False, True]
    assert middle.tolist() == [False, True, True, True]
    assert last.all()
    assert early_exit_layers("none", 4, 50, 100, 1).tolist() == [False, False, False, True]


def test_early_exit_weights():
    weights = early_exit_weights(torch.ones(5, dtype=torch.bool), e_scale=1.0)
    # e(l) = sum_{i<=l} i = 0, 1, 3, 6 and the last layer 4 + 6 = 10; normalised by 20
    torch.testing.assert_close(weights, torch.tensor([0, 1, 3, 6, 10]) / 20)
    some = early_exit_weights(torch.tensor([False, True, False, False, True]), e_scale=0.5)
    torch.testing.assert_close(some, torch.tensor([0, 0.5, 0, 0, 7]) / 7.5)
    only_last = early_exit_weights(torch.tensor([False, False, False, False, True]), e_scale=0.5)
    assert only_last.tolist() == [0, 0, 0, 0, 1]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=4, vocab_size=32, eos_token_id=None).requires_grad_(True)  # trained here


def test_without_dropout_the_loss_is_the_models_own(model):
    ids = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(0))
    out = recipe_forward(model, ids, torch.zeros(4), weights=None)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=0)
    assert out.kept.all() and not torch.isnan(out.layer_losses).any()


def test_early_exit_loss_is_the_weighted_sum_of_layer_losses(model):
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(1))
    weights = early_exit_weights(torch.tensor([False, True, False, True]), e_scale=1.0)
    out = recipe_forward(model, ids, torch.zeros(4), weights)
    assert torch.isnan(out.layer_losses[[0, 2]]).all()
    expected = sum(weights[i] * out.layer_losses[i] for i in (1, 3))
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
    model.zero_grad()


def test_layer_dropout_skips_layers_at_the_configured_rates(model):
    rates = torch.tensor([0.0, 0.1, 0.3, 0.6])
    ids = torch.randint(0, 32, (64, 4), generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        kept = torch.cat([recipe_forward(model, ids, rates, None, generator).kept for _ in range(40)], dim=1)
    dropped = 1 - kept.float().mean(dim=1)  # over 2560 samples per layer
    standard_error = (rates * (1 - rates) / kept.shape[1]).sqrt()
    assert dropped[0] == 0
    assert ((dropped - rates).abs() <= 4 * standard_error + 1e-9).all(), dropped


def test_a_dropped_layer_is_skipped_for_that_sample_only(model):
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = recipe_forward(model, ids, torch.zeros(4), None)
        # rate 1 for the last layer: every sample skips it, so its exit equals the exit of layer 2
        skipped = recipe_forward(model, ids, torch.tensor([0.0, 0.0, 0.0, 1.0]), None)
    assert not skipped.kept[3].any()
    torch.testing.assert_close(skipped.layer_losses[3], full.layer_losses[2])
    assert not torch.isclose(full.layer_losses[3], full.layer_losses[2])


def test_uniform_exit_weights():
    weights = early_exit_weights(torch.tensor([True, False, True, True]), e_scale=0.5, weighting="uniform")
    torch.testing.assert_close(weights, torch.tensor([0.5, 0, 0.5, 1]) / 2)


def test_agreement_is_the_share_of_positions_where_the_exit_picks_the_last_layers_token(model):
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(5))
    out = recipe_forward(model, ids, torch.zeros(4), None)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True)
        final = states.logits[:, :-1].argmax(-1)
        for i in range(3):
            exit_choice = model.lm_head(model.model.norm(states.hidden_states[i + 1]))[:, :-1].argmax(-1)
            torch.testing.assert_close(out.agreement[i], (exit_choice == final).float().mean())
    assert out.agreement[3] == 1


def test_distillation_mixes_each_exits_cross_entropy_with_the_kl_from_the_last_layer(model):
    """Against a direct computation from transformers' own hidden states."""
    ids = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(6))
    weights = torch.tensor([0.0, 0.3, 0.2, 0.5])
    alpha, tau = 0.4, 2.0
    out = recipe_forward(model, ids, torch.zeros(4), weights, distillation=Distillation(alpha, tau))
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True)
        targets = ids[:, 1:].reshape(-1)
        last = states.logits[:, :-1].reshape(-1, 32)
        teacher = F.softmax(last / tau, dim=-1)
        expected = 0.5 * F.cross_entropy(last, targets)
        for i in (1, 2):
            logits = model.lm_head(model.model.norm(states.hidden_states[i + 1]))[:, :-1].reshape(-1, 32)
            kl = (teacher * (teacher.log() - F.log_softmax(logits / tau, dim=-1))).sum(-1).mean()
            expected += weights[i] * ((1 - alpha) * F.cross_entropy(logits, targets) + alpha * tau**2 * kl)
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=1e-5)
    plain = recipe_forward(model, ids, torch.zeros(4), weights)
    assert not torch.isclose(plain.loss, out.loss)
    torch.testing.assert_close(recipe_forward(model, ids, torch.zeros(4), weights, distillation=Distillation(0.0)).loss,
                               plain.loss)


def test_the_teacher_gets_no_gradient(model):
    """With the loss at exit 2 only and the KL alone, nothing after layer 2 may move: the last layer's distribution
    is a fixed target, not pulled toward the exit."""
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(7))
    out = recipe_forward(model, ids, torch.zeros(4), torch.tensor([0.0, 1.0, 0.0, 0.0]), distillation=Distillation(1.0))
    out.loss.backward()
    grads = [layer.mlp.down_proj.weight.grad for layer in model.model.layers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads[:2])
    assert all(g is None or not g.any() for g in grads[2:])
    model.zero_grad(set_to_none=True)


def test_a_training_step_makes_the_host_wait_for_nothing(model):
    """Which layers run and which exits count is decided once, from the draw and the weights on the host; nothing
    in a forward and backward pass with dropout, early exits and distillation blocks on the device (counted at the
    aten level as in test_device_reads.py; the old per-layer `kept[i].any()` counts there)."""
    from test_device_reads import HostWaits

    ids = torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(5))
    rates, weights = torch.tensor([0.0, 0.3, 0.5, 0.5]), early_exit_weights(torch.tensor([0, 1, 0, 1]).bool(), 1.0)
    generator = torch.Generator().manual_seed(6)
    trainable = tiny_llama(num_layers=4, vocab_size=32).requires_grad_(True).train()
    with HostWaits() as waits:
        out = recipe_forward(trainable, ids, rates, weights, generator, Distillation(0.5, 1.0))
        out.loss.backward()
    assert waits.counts == {} and not out.kept.all() and out.kept[0].all()
