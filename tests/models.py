"""Small random decoders built from a config, for tests (no download)."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast


def tiny_llama(
    gqa: bool = True,
    tied: bool = True,
    num_layers: int = 6,
    vocab_size: int = 96,
    layer_scale: float = 0.1,
    init_std: float = 0.2,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A float32 Llama. What layer i adds to the residual stream is scaled by layer_scale ** (i / (L - 1)), so
    deeper layers change less, as in a LayerSkip-trained model: early exits agree with the full model often but
    not always, and drafts get both accepted and rejected."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        tie_word_embeddings=tied,
        initializer_range=init_std,
        **({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, "max_position_embeddings": 256} | overrides),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            scale = layer_scale ** (i / max(num_layers - 1, 1))
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return model


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: <s>=0, </s>=1, then the 256 bytes (vocabulary of 258)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1} | {char: i + 2 for i, char in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def save_tiny_checkpoint(directory, **model_overrides) -> None:
    """A tiny model and its byte tokenizer in Hugging Face format, loadable with --model DIRECTORY."""
    model = tiny_llama(vocab_size=258, **model_overrides)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
