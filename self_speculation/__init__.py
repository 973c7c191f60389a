"""Early-exit inference and self-speculative decoding for Hugging Face decoders with the Llama layout."""

from .config import GenerationConfig
from .errors import UsageError
from .generator import GenerationResult, Generator
from .hf import layerskip_generate
from .strategies import STRATEGIES

__all__ = ["GenerationConfig", "GenerationResult", "Generator", "STRATEGIES", "UsageError", "layerskip_generate"]
