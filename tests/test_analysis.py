"""Per-exit analysis: agreement of early exits with the last layer, acceptance by exit layer."""

import torch

from models import byte_tokenizer, tiny_llama
from self_speculation import layers
from self_speculation.analysis import acceptance_by_exit, exit_agreement


def test_exit_agreement_matches_a_direct_computation():
    model = tiny_llama(eos_token_id=None)
    sequences = [[0, 5, 17, 33, 2, 9, 41], [0, 71, 71, 4]]
    agreement = exit_agreement(model, sequences)
    assert len(agreement) == 6 and agreement[-1] == 1.0
    with torch.no_grad():
        hidden_states = [model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states for s in sequences]
        for exit_layer in (1, 3):
            same = total = 0
            for s, states in zip(sequences, hidden_states):
                early = layers.head(model, states[exit_layer]).argmax(-1)
                final = model(input_ids=torch.tensor([s])).logits.argmax(-1)
                same += (early == final).sum().item()
                total += len(s)
            assert abs(agreement[exit_layer - 1] - same / total) < 1e-6


def test_acceptance_grows_towards_the_last_layer():
    model = tiny_llama(vocab_size=258, eos_token_id=None)
    rates = acceptance_by_exit(model, byte_tokenizer(), ["def f(x):", "import os"], [1, 5], 3, 24)
    assert 0 <= rates[1] < rates[5] <= 1
