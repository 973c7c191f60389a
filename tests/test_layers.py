"""Our layer runner against the model's own forward."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from models import tiny_llama

from self_speculation import UsageError, layers

IDS = torch.tensor([[0, 5, 17, 33, 2, 9, 41, 77, 3, 12, 60, 8]])  # (1, 12)
ATOL, RTOL = 1e-5, 1e-5  # fp32; joined projections round differently from separate ones in the last bits


def reference_logits(model, ids=IDS):
    return model(input_ids=ids, use_cache=False).logits


@torch.inference_mode()
def test_full_forward_prefill(model):
    ours = layers.full_forward(model, IDS, layers.new_cache())
    torch.testing.assert_close(ours, reference_logits(model), atol=ATOL, rtol=RTOL)


@torch.inference_mode()
@pytest.mark.parametrize("chunks", [(12,), (5, 7), (1, 4, 3, 4), (1,) * 12])
@pytest.mark.parametrize("capacity", [256, 1], ids=["preallocated", "growing"])
def test_full_forward_chunked_with_cache(model, chunks, capacity):
    cache, pieces, start = layers.new_cache(capacity), [], 0
    for size in chunks:
        pieces.append(layers.full_forward(model, IDS[:, start : start + size], cache))
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference_logits(model), atol=ATOL, rtol=RTOL)
    assert cache.held == [IDS.shape[1]] and cache.lengths.tolist() == [IDS.shape[1]]


@torch.inference_mode()
@pytest.mark.parametrize("exit_layer", [1, 3, 5])
def test_early_exit_is_norm_and_head_of_that_layer(model, exit_layer):
    hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states[exit_layer]  # output of layer E - 1
    expected = model.lm_head(model.model.norm(hidden))
    out = layers.early_exit(model, IDS, None, exit_layer)
    torch.testing.assert_close(out.logits, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.hidden, hidden, atol=ATOL, rtol=RTOL)


@torch.inference_mode()
@pytest.mark.parametrize("exit_layer", [1, 3, 5])
def test_remainder_over_exit_hiddens_completes_the_full_model(model, exit_layer):
    """Prefill 8 tokens, run 4 more through the first E layers one by one, each one position further (as drafting
    does), then the rest of the layers over their cached exit-layer hidden states at once (as verification does)."""
    cache, decoder = layers.new_cache(), layers.Decoder(model)
    decoder.full_forward(IDS[:, :8], cache)
    cache.commit([8])
    hiddens = [decoder.exit_hidden(IDS[:, 8 + i : 9 + i], cache, exit_layer, offset=i) for i in range(4)]
    logits = decoder.remainder(torch.cat(hiddens, dim=1), cache, exit_layer)
    torch.testing.assert_close(logits, reference_logits(model)[:, 8:], atol=ATOL, rtol=RTOL)


@torch.inference_mode()
@pytest.mark.parametrize("capacity", [256, 7], ids=["preallocated", "growing-over-rejected"])
def test_positions_not_committed_are_overwritten(model, capacity):
    """A step's rejected positions (written, not committed) are hidden, then overwritten by the next pass."""
    cache, decoder = layers.new_cache(capacity), layers.Decoder(model)
    layers.full_forward(model, IDS[:, :6], cache)
    decoder.full_forward(torch.tensor([[90, 91, 92]]), cache)  # rejected: not committed
    assert cache.held == [6]
    logits = layers.full_forward(model, IDS[:, 6:], cache)
    torch.testing.assert_close(logits, reference_logits(model)[:, 6:], atol=ATOL, rtol=RTOL)


def small(config_class, model_class, **extra):
    config = config_class(**{
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, **extra,
    })
    torch.manual_seed(0)
    return model_class(config).eval().requires_grad_(False)


@pytest.mark.parametrize(
    "build",
    [
        lambda: small(Qwen2Config, Qwen2ForCausalLM),
        lambda: small(MistralConfig, MistralForCausalLM, sliding_window=8),
    ],
    ids=["qwen2", "mistral-sliding-window"],
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@torch.inference_mode()
def test_other_llama_layout_models(build, compiled):
    """Biases (Qwen2) and a sliding window shorter than the sequence (Mistral), also through a compiled
    one-token pass, which masks the window over the whole buffer."""
    model = build()
    layers.check_forward(model)
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    cache, decoder = layers.new_cache(32), layers.Decoder(model)
    passes = layers.CompiledPasses(decoder, {(0, 3, 1)}) if compiled else None
    pieces = []
    for piece in [ids[:, :12]] + [ids[:, i : i + 1] for i in range(12, 20)]:
        pieces.append(decoder.full_forward(piece, cache, compiled=passes))
        cache.commit([piece.shape[1]])
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference_logits(model, ids), atol=ATOL, rtol=RTOL)
    assert not compiled or passes.shapes_run == {(0, 3, 1)}  # the one-token passes did run compiled


def test_model_without_the_layout_is_named():
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    with pytest.raises(UsageError, match=r"GPT2LMHeadModel .*model\.model\.embed_tokens is missing"):
        layers.check_layout(GPT2LMHeadModel(config))


@pytest.mark.parametrize(
    "build, reason",
    [
        # Gemma 2 has the same attribute names but other norms and capped logits
        (lambda: small(Gemma2Config, Gemma2ForCausalLM, head_dim=16, final_logit_softcapping=1.0), "not a Llama-style"),
        # Qwen 3 has every Llama piece plus norms on queries and keys, which a Llama layer does not apply
        (lambda: small(Qwen3Config, Qwen3ForCausalLM, head_dim=16), "does not reproduce"),
    ],
    ids=["gemma2", "qwen3"],
)
def test_model_with_the_layout_but_other_maths_is_refused(build, reason):
    with pytest.raises(UsageError, match=reason):
        layers.check_forward(build())


def test_frozen_projections_are_joined_without_a_copy_and_trainable_ones_are_not():
    """The parameters stay the same objects with the same values; their data becomes rows of the joined matrix,
    and a second holder of the same model finds them joined (no copy)."""
    frozen = small(MistralConfig, MistralForCausalLM)
    trainable = small(MistralConfig, MistralForCausalLM).requires_grad_(True)
    parameters = dict(frozen.named_parameters())
    values = {name: p.detach().clone() for name, p in parameters.items()}
    w = layers.Weights(frozen)(0, 1)[0]
    attn = frozen.model.layers[0].self_attn
    assert w.qkv[0].shape == (64 + 2 * 32, 64) and w.gate_up[0].shape == (2 * 128, 64)
    assert attn.k_proj.weight.untyped_storage().data_ptr() == w.qkv[0].untyped_storage().data_ptr()
    assert dict(frozen.named_parameters()) == parameters  # the same Parameter objects, none added
    assert all(torch.equal(p, values[name]) for name, p in frozen.named_parameters())
    again = layers.Weights(frozen)(0, 1)[0]
    assert again.qkv[0].data_ptr() == w.qkv[0].data_ptr() and again.gate_up[0].data_ptr() == w.gate_up[0].data_ptr()
    assert layers.Weights(trainable)(0, 1)[0].qkv is None
    with torch.inference_mode():
        joined = layers.full_forward(frozen, IDS, layers.new_cache())
        torch.testing.assert_close(joined, reference_logits(frozen), atol=ATOL, rtol=RTOL)  # the modules still work
    separate = layers.full_forward(trainable, IDS, layers.new_cache())
    torch.testing.assert_close(separate.detach(), joined, atol=ATOL, rtol=RTOL)
    separate.sum().backward()
    assert trainable.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


LLAMA_3_2_1B_WIDTH = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                          rope_theta=500000.0, tie_word_embeddings=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "build",
    [
        # deep, and with every layer adding at full scale: rounding grows through 32 layers (10% of the largest
        # logit in bfloat16, twice what the check allowed before)
        lambda: tiny_llama(num_layers=32, layer_scale=1.0, vocab_size=512),
        # Llama 3.2 1B's width (its 16 layers and 128k vocabulary are measured in docs/benchmarks.md, too slow for a test)
        lambda: small(LlamaConfig, LlamaForCausalLM, num_hidden_layers=2, **LLAMA_3_2_1B_WIDTH),
    ],
    ids=["deep", "llama-3.2-1b-width"],
)
def test_half_precision_models_with_the_llama_maths_are_accepted(build, dtype):
    model = build().to(dtype)
    layers.check_forward(model)
    layers.check_forward(model, list(range(30, 46)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models_with_other_maths_are_refused(dtype):
    with pytest.raises(UsageError, match="does not reproduce"):
        layers.check_forward(small(Qwen3Config, Qwen3ForCausalLM, head_dim=16).to(dtype))
    with pytest.raises(UsageError, match="not a Llama-style"):
        layers.check_forward(small(Gemma2Config, Gemma2ForCausalLM, head_dim=16).to(dtype))


class _Doubled(torch.nn.Linear):
    """A projection whose module computes something its weight does not say (as a quantized layer would)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_half_precision_weights_the_runner_cannot_read_are_refused():
    model = tiny_llama(num_layers=4).to(torch.bfloat16)
    down = model.model.layers[1].mlp.down_proj
    doubled = _Doubled(down.in_features, down.out_features, bias=False, dtype=torch.bfloat16)
    doubled.weight = down.weight
    model.model.layers[1].mlp.down_proj = doubled
    with pytest.raises(UsageError, match="does not reproduce"):
        layers.check_forward(model)


@torch.inference_mode()
def test_a_model_cast_or_moved_after_use_runs_with_its_new_weights():
    model = tiny_llama(num_layers=3)
    before = layers.full_forward(model, IDS, layers.new_cache())
    model.to(torch.bfloat16)
    half = layers.full_forward(model, IDS, layers.new_cache())
    assert half.dtype == torch.float32 and (half - before).abs().max() < 0.1 * before.abs().max()
    model.to(torch.float32)  # the joined weights follow: no stale bfloat16 copy
    torch.testing.assert_close(layers.full_forward(model, IDS, layers.new_cache()), reference_logits(model),
                               atol=ATOL, rtol=RTOL)


@torch.inference_mode()
def test_ragged_batch_rows_equal_their_own_forward(model):
    """Rows of different lengths in one cache: a right-padded prefill, steps of one and of three tokens, and
    commits of different counts per row; every row's logits are those of the row alone."""
    prompts = [IDS[0, :5].tolist(), IDS[0].tolist(), IDS[0, :8].tolist()]
    width = max(len(p) for p in prompts)
    cache, decoder = layers.new_cache(16, batch=3), layers.Decoder(model)  # small: the buffers grow on the way
    logits = decoder.full_forward(torch.tensor([p + [0] * (width - len(p)) for p in prompts]), cache)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[row, : len(prompt)], reference_logits(model, torch.tensor([prompt]))[0],
                                   atol=ATOL, rtol=RTOL)
    cache.commit([len(p) for p in prompts])
    sequences = [list(p) for p in prompts]
    for new, kept in (([[7], [8], [9]], None), ([[1, 2, 3], [4, 5, 6], [70, 80, 90]], [3, 1, 2]),
                      ([[10], [11], [12]], None), ([[13, 14, 15], [16, 17, 18], [19, 20, 21]], [0, 3, 1])):
        out = decoder.full_forward(torch.tensor(new), cache)
        for row in range(3):
            expected = reference_logits(model, torch.tensor([sequences[row] + new[row]]))[0, -len(new[row]):]
            torch.testing.assert_close(out[row], expected, atol=ATOL, rtol=RTOL)
        kept = kept or [len(row) for row in new]
        cache.commit(kept)
        sequences = [s + row[:k] for s, row, k in zip(sequences, new, kept)]
    assert cache.held == [len(s) for s in sequences] and cache.lengths.tolist() == cache.held


def test_a_model_saved_after_generating_reloads_with_the_same_logits(tmp_path):
    """Generating joins the projections (the parameters read rows of one matrix); save_pretrained must still write
    every weight whole, and AutoModelForCausalLM read them back."""
    from transformers import AutoModelForCausalLM

    from self_speculation import GenerationConfig, Generator

    model = tiny_llama(num_layers=3, tied=False)
    Generator(model, None, GenerationConfig(sample=False, max_steps=4)).generate_ids([0, 5, 17])
    assert layers.Weights(model)(0, 1)[0].qkv is not None  # joined
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, reference_logits(model), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rotary_table_holds_what_the_rotary_module_computes(model, dtype):
    """Bit for bit, shared and per-row positions: the table changes no decoded token."""
    table = layers.runner.rotary_table(model, torch.device("cpu"), dtype, 128)
    assert table[0].shape == (128, model.config.head_dim)
    hidden = torch.zeros(2, 2, model.config.hidden_size, dtype=dtype)
    for positions in (torch.tensor([5, 6]), torch.tensor([[3, 4], [0, 127]])):
        for gathered, computed in zip(layers.runner.rotary(model, hidden, positions, table),
                                      layers.runner.rotary(model, hidden, positions)):
            assert gathered.dtype == dtype and torch.equal(gathered, computed)


@torch.inference_mode()
def test_frequencies_that_change_with_the_length_are_computed_per_pass():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = small(LlamaConfig, LlamaForCausalLM, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                    "rope_theta": 10000.0})
    assert layers.runner.rotary_table(model, torch.device("cpu"), torch.float32, 64) is None
    ids = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layers.full_forward(model, ids, layers.new_cache()), reference_logits(model, ids),
                               atol=ATOL, rtol=RTOL)
