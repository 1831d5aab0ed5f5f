"""Llama-family models: config, NNX implementation, checkpoint loading."""

from qlora_jax._src.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from qlora_jax._src.models.export import merged_tensors, save_merged
from qlora_jax._src.models.generate import generate
from qlora_jax._src.models.llama import LLAMA_AXES, AttentionMask, CausalLM, KVCache, RMSNorm, causal_mask
from qlora_jax._src.models.loading import from_pretrained, hf_name_to_path, load_config, load_tokenizer
from qlora_jax._src.models.peft_convert import save_peft_adapter_over_original, save_residual_base
from qlora_jax._src.models.peft_io import adapter_layers, load_peft_adapter, save_peft_adapter

__all__ = [
    "LLAMA_AXES",
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "AttentionMask",
    "KVCache",
    "generate",
    "ModelConfig",
    "RMSNorm",
    "causal_mask",
    "from_pretrained",
    "hf_name_to_path",
    "load_config",
    "load_tokenizer",
    "adapter_layers",
    "load_peft_adapter",
    "merged_tensors",
    "save_merged",
    "save_peft_adapter",
    "save_peft_adapter_over_original",
    "save_residual_base",
]
