"""Llama-family models: config, NNX implementation, checkpoint loading."""

from qlora_jax._src.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from qlora_jax._src.models.llama import CausalLM, RMSNorm, causal_mask
from qlora_jax._src.models.loading import from_pretrained, hf_name_to_path, load_config, load_tokenizer

__all__ = ["SUPPORTED_MODEL_TYPES", "CausalLM", "ModelConfig", "RMSNorm", "causal_mask", "from_pretrained",
           "hf_name_to_path", "load_config", "load_tokenizer"]
