"""`ModelConfig`: the Llama-family architecture, read from a Hugging Face config.

One config covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3: they
differ in biases, q/k normalization, RoPE frequencies, tied embeddings and
sliding-window attention. `ModelConfig.from_hf` refuses every setting that
would change the math and is not implemented, naming the config key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["ModelConfig", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a Llama-family decoder.

    Attributes:
        model_type: "llama", "mistral", "qwen2" or "qwen3".
        vocab_size: Tokens in the vocabulary.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the SwiGLU MLP.
        num_layers: Decoder layers.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (grouped-query attention when fewer).
        head_dim: Width of one head.
        rms_norm_eps: Epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: None, or Llama 3's frequency scaling parameters
            `{"factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`.
        max_position_embeddings: Longest context of the checkpoint.
        tie_word_embeddings: The output head is the embedding matrix.
        qkv_bias: q/k/v projections have a bias (Qwen2; Llama's attention_bias).
        o_bias: The output projection has a bias (Llama's attention_bias).
        mlp_bias: The MLP projections have biases (Llama's mlp_bias).
        qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3).
        sliding_window: Keys further back than this many positions are masked
            (Mistral), or None.

    Example:
        >>> from qlora_jax.models import ModelConfig
        >>> cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=192,
        ...                   num_layers=2, num_heads=4, num_kv_heads=2)
        >>> cfg.head_dim, cfg.num_params
        (16, 115008)
    """

    model_type: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, float] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type: {self.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"head_dim: not given and hidden_size {self.hidden_size} is not divisible by "
                                 f"num_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} - set(
                self.rope_scaling)
            if missing:
                raise ValueError(f"rope_scaling: llama3 scaling needs {sorted(missing)}")
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))

    def __hash__(self) -> int:
        return hash(tuple((f.name, repr(getattr(self, f.name))) for f in dataclasses.fields(self)))

    @property
    def num_params(self) -> int:
        """Parameters of the float model (the embedding counted once when tied)."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        attn += (h * hd + 2 * kv * hd if self.qkv_bias else 0) + (d if self.o_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d if self.mlp_bias else 0)
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies `[head_dim // 2]` (float64), Llama 3 scaling applied.

        Example:
            >>> from qlora_jax.models import ModelConfig
            >>> cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
            ...                   num_kv_heads=1, rope_theta=100.0)
            >>> cfg.inv_freq().tolist()
            [1.0, 0.31622776601683794, 0.1, 0.03162277660168379]
        """
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))
        if self.rope_scaling is None:
            return inv_freq
        s = self.rope_scaling
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled)

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Reads a `transformers` config (`AutoConfig`) of a supported model.

        Args:
            hf_config: A `transformers.PretrainedConfig`.

        Returns:
            The `ModelConfig`.

        Raises:
            ValueError: An unsupported `model_type` (the supported ones are
                listed) or a setting that changes the math and is not
                implemented (named by its config key).

        Example:
            >>> import transformers
            >>> from qlora_jax.models import ModelConfig
            >>> hf = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192,
            ...                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
            >>> ModelConfig.from_hf(hf).num_kv_heads
            2
        """
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type: {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        get = _getter(hf_config)
        if get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: {get('hidden_act')!r} is not implemented (only 'silu')")
        if get("pretraining_tp", 1) not in (None, 1):
            raise ValueError(f"pretraining_tp: {get('pretraining_tp')} is not implemented (only 1)")
        rope = dict(get("rope_parameters", None) or get("rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type: {rope_type!r} is not implemented; supported: {_ROPE_TYPES}")
        theta = rope.get("rope_theta", get("rope_theta", 10000.0))
        if float(rope.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
            raise ValueError("partial_rotary_factor: partial rotary embeddings are not implemented")
        if rope_type == "llama3":
            scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings") if k in rope}
        else:
            scaling = None
        sliding = None
        if model_type == "mistral":
            sliding = get("sliding_window", None)
        elif model_type in ("qwen2", "qwen3") and get("use_sliding_window", False):
            raise ValueError(f"use_sliding_window: Qwen's per-layer sliding window is not implemented "
                             f"({model_type} with use_sliding_window=True)")
        layer_types = get("layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types) and model_type != "mistral":
            raise ValueError(f"layer_types: only 'full_attention' layers are implemented, got "
                             f"{sorted(set(layer_types))}")
        attention_bias = bool(get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=int(get("num_attention_heads")),
            num_kv_heads=int(get("num_key_value_heads", None) or get("num_attention_heads")),
            head_dim=get("head_dim", None),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type in ("llama", "qwen3") else False,
            mlp_bias=bool(get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=None if sliding is None else int(sliding),
        )

    def to_hf(self) -> Any:
        """The matching `transformers` config (for `save_merged`)."""
        import transformers

        kwargs = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
        )
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **self.rope_scaling}
        kwargs["rope_parameters"] = rope
        if self.model_type == "llama":
            kwargs.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            kwargs["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen3":
            kwargs["attention_bias"] = self.qkv_bias
        return transformers.AutoConfig.for_model(self.model_type, **kwargs)


def _getter(obj: Any):
    """`get(key, default)` over a config object's attributes."""
    missing = object()

    def get(key: str, default: Any = missing) -> Any:
        value = getattr(obj, key, missing)
        if value is missing:
            if default is missing:
                raise ValueError(f"{key}: missing from the model config")
            return default
        return value

    return get
