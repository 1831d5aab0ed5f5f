"""Llama-family models (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3) from Hugging Face checkpoints.

Example:
    >>> from qlora_jax.models import ModelConfig
    >>> ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
    ...             num_kv_heads=2).head_dim
    16
"""

from qlora_jax._src.models import (
    SUPPORTED_MODEL_TYPES,
    CausalLM,
    KVCache,
    ModelConfig,
    RMSNorm,
    adapter_layers,
    causal_mask,
    from_pretrained,
    generate,
    hf_name_to_path,
    load_config,
    load_peft_adapter,
    load_tokenizer,
    merged_tensors,
    save_merged,
    save_peft_adapter,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
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
]
