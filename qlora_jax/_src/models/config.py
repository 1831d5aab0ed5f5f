"""`ModelConfig`: a decoder architecture, read from a Hugging Face config.

One config covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3
(text), Phi-3, OLMo-2 and Granite: they differ in biases, norms (kind and
placement), q/k normalization, the gated MLP's activation, fused projections,
RoPE frequencies (partial, scaled, per layer kind), soft-capping, scalar
multipliers, tied embeddings and sliding-window attention (every layer, or
alternating with global layers). `ModelConfig.from_hf` refuses every setting
that would change the math and is not implemented, naming the config key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

__all__ = ["ModelConfig", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                          "phi3", "olmo2", "granite", "mixtral")
_ROPE_TYPES = ("default", "llama3", "linear")
_ROPE_KEYS = {"llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
              "linear": {"factor"}}
_GEMMA = ("gemma", "gemma2", "gemma3_text")
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF name -> ours
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a Llama-style decoder (one of `SUPPORTED_MODEL_TYPES`).

    Attributes:
        model_type: One of `SUPPORTED_MODEL_TYPES`.
        vocab_size: Tokens in the vocabulary.
        hidden_size: Width of the residual stream.
        intermediate_size: Width of the SwiGLU MLP.
        num_layers: Decoder layers.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (grouped-query attention when fewer).
        head_dim: Width of one head.
        rms_norm_eps: Epsilon of every RMSNorm.
        rope_theta: RoPE base.
        rope_scaling: None, or the frequency scaling of the (global) layers:
            Llama 3's `{"factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}` (`"rope_type": "llama3"`, the
            default), or `{"rope_type": "linear", "factor"}` (Gemma 3).
        max_position_embeddings: Longest context of the checkpoint.
        tie_word_embeddings: The output head is the embedding matrix.
        qkv_bias: q/k/v projections have a bias (Qwen2; Llama's attention_bias).
        o_bias: The output projection has a bias (Llama's attention_bias).
        mlp_bias: The MLP projections have biases (Llama's mlp_bias).
        qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3).
        sliding_window: Keys further back than this many positions are masked
            (Mistral, Phi-3; Gemma 2/3 in their sliding layers), or None.
        layer_types: Per layer, "sliding_attention" or "full_attention" when
            they alternate (Gemma 2/3); None: every layer alike.
        rope_local_theta: RoPE base of the sliding layers when it differs
            from `rope_theta` (Gemma 3's `rope_local_base_freq`), or None.
        partial_rotary_factor: Fraction of each head's dimensions that RoPE
            rotates (the first ones, Phi-3); the rest pass unchanged.
        hidden_act: The gated MLP's activation: "silu" (SwiGLU) or
            "gelu_tanh" (GeGLU with the tanh approximation, Gemma).
        norm_style: "llama" (`weight * normalized` cast first), "gemma"
            (`(1 + weight) * normalized` in float32) or "olmo2"
            (`weight * normalized` in float32).
        norm_placement: "pre" (norm before attention and MLP), "sandwich"
            (also after each, Gemma 2/3) or "post" (only after each, OLMo-2).
        qk_norm_width: "head" (q/k norms over each head, Qwen3, Gemma 3) or
            "projection" (over the whole projection, OLMo-2).
        fused_qkv: One `qkv_proj` instead of q/k/v projections (Phi-3).
        fused_gate_up: One `gate_up_proj` (gate first) instead of two (Phi-3).
        embed_scale: The embeddings are multiplied by this (Gemma's
            `sqrt(hidden_size)`, Granite's `embedding_multiplier`), or None.
        attn_scale: Scale of the attention scores; None: `head_dim ** -0.5`
            (Gemma 2/3: `query_pre_attn_scalar ** -0.5`; Granite:
            `attention_multiplier`).
        attn_logit_softcap: Scores become `cap * tanh(scores / cap)` (Gemma 2).
        final_logit_softcap: Logits become `cap * tanh(logits / cap)` (Gemma 2).
        residual_multiplier: Each block's output is multiplied by this before
            the residual addition (Granite).
        logits_scaling: Logits are divided by this (Granite).
        num_experts: Experts of each layer's mixture-of-experts MLP (Mixtral), or 0 for one dense MLP.
        num_experts_per_tok: Experts each token is routed to (top-k of the router's softmax, renormalized).

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
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    partial_rotary_factor: float = 1.0
    hidden_act: str = "silu"
    norm_style: str = "llama"
    norm_placement: str = "pre"
    qk_norm_width: str = "head"
    fused_qkv: bool = False
    fused_gate_up: bool = False
    embed_scale: float | None = None
    attn_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    num_experts: int = 0
    num_experts_per_tok: int = 2

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
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor: must lie in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ValueError(f"head_dim: RoPE needs an even number of rotated dimensions, got {self.rotary_dim} "
                             f"(head_dim {self.head_dim}, partial_rotary_factor {self.partial_rotary_factor})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", "llama3")
            if kind not in _ROPE_KEYS:
                raise ValueError(f"rope_scaling: rope_type {kind!r} is not implemented; supported: {tuple(_ROPE_KEYS)}")
            missing = _ROPE_KEYS[kind] - set(self.rope_scaling)
            if missing:
                raise ValueError(f"rope_scaling: {kind} scaling needs {sorted(missing)}")
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        for name, allowed in (("hidden_act", ("silu", "gelu_tanh")), ("norm_style", ("llama", "gemma", "olmo2")),
                              ("norm_placement", ("pre", "sandwich", "post")),
                              ("qk_norm_width", ("head", "projection"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r}, expected one of {allowed}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok: {self.num_experts_per_tok}, expected 1..{self.num_experts}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(_LAYER_TYPES):
                raise ValueError(f"layer_types: {self.num_layers} entries of {_LAYER_TYPES} expected, got "
                                 f"{self.layer_types}")
            if self.sliding_window is None:
                raise ValueError("layer_types: sliding layers need a sliding_window")

    def __hash__(self) -> int:
        return hash(tuple((f.name, repr(getattr(self, f.name))) for f in dataclasses.fields(self)))

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (`head_dim` unless partial)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def sliding_layers(self) -> np.ndarray | None:
        """`[num_layers]` bool, True for the sliding-window layers when they alternate with global ones, else None."""
        if self.layer_types is None:
            return None
        return np.asarray([t == "sliding_attention" for t in self.layer_types])

    @property
    def num_params(self) -> int:
        """Parameters of the float model (the embedding counted once when tied)."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        attn += (h * hd + 2 * kv * hd if self.qkv_bias else 0) + (d if self.o_bias else 0)
        if self.qk_norm:
            attn += 2 * hd if self.qk_norm_width == "head" else (h + kv) * hd
        mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d if self.mlp_bias else 0)
        if self.num_experts:
            mlp = self.num_experts * mlp + d * self.num_experts  # experts and the router
        layer = attn + mlp + (4 if self.norm_placement == "sandwich" else 2) * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head

    def inv_freq(self, local: bool = False) -> np.ndarray:
        """RoPE inverse frequencies `[rotary_dim // 2]` (float64), scaling applied.

        Args:
            local: The sliding layers' frequencies (`rope_local_theta`, unscaled) instead of the global ones.

        Example:
            >>> from qlora_jax.models import ModelConfig
            >>> cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1,
            ...                   num_kv_heads=1, rope_theta=100.0)
            >>> cfg.inv_freq().tolist()
            [1.0, 0.31622776601683794, 0.1, 0.03162277660168379]
        """
        dim = self.rotary_dim
        theta = self.rope_local_theta if local and self.rope_local_theta is not None else self.rope_theta
        inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))
        if self.rope_scaling is None or local:
            return inv_freq
        s = self.rope_scaling
        if s.get("rope_type", "llama3") == "linear":
            return inv_freq / float(s["factor"])
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
        gemma = model_type in _GEMMA
        if model_type in ("gemma2", "gemma3_text"):
            act_key, act = "hidden_activation", get("hidden_activation", None) or get("hidden_act", "gelu_pytorch_tanh")
        else:
            act_key, act = "hidden_act", get("hidden_act", "silu")
            if model_type == "gemma" and act == "gelu":  # as GemmaConfig: the legacy name of the tanh approximation
                act = "gelu_pytorch_tanh"
        if act not in _ACTIVATIONS:
            raise ValueError(f"{act_key}: {act!r} is not implemented (only {sorted(_ACTIVATIONS)})")
        if get("pretraining_tp", 1) not in (None, 1):
            raise ValueError(f"pretraining_tp: {get('pretraining_tp')} is not implemented (only 1)")
        if get("use_bidirectional_attention", False):
            raise ValueError("use_bidirectional_attention: bidirectional attention is not implemented")
        rope = dict(get("rope_parameters", None) or get("rope_scaling", None) or {})
        local_theta = None
        if model_type == "gemma3_text":  # RoPE parameters per layer type
            local = dict(rope.get("sliding_attention") or {})
            rope = dict(rope.get("full_attention") or {})
            local_type = local.get("rope_type", local.get("type", "default"))
            if local_type != "default":
                raise ValueError(f"rope_parameters.sliding_attention.rope_type: {local_type!r} is not implemented "
                                 "(only 'default' for the sliding layers)")
            local_theta = float(local.get("rope_theta", get("rope_local_base_freq", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_parameters.rope_type: {rope_type!r} is not implemented; supported: {_ROPE_TYPES}")
        theta = rope.get("rope_theta", get("rope_theta", 10000.0))
        partial = float(rope.get("partial_rotary_factor", get("partial_rotary_factor", 1.0)) or 1.0)
        if partial != 1.0 and model_type != "phi3":
            raise ValueError(f"partial_rotary_factor: partial rotary embeddings are not implemented for {model_type}")
        if rope_type == "default":
            scaling = None
        else:
            scaling = {k: rope[k] for k in _ROPE_KEYS[rope_type] if k in rope}
            if rope_type == "linear":
                scaling["rope_type"] = "linear"
        sliding = None
        layer_types = get("layer_types", None)
        if model_type in ("mistral", "phi3", "mixtral"):
            sliding = get("sliding_window", None)
        elif model_type in ("gemma2", "gemma3_text"):
            sliding = get("sliding_window", None)
            if not layer_types:  # as transformers fills them in
                pattern = 2 if model_type == "gemma2" else int(get("sliding_window_pattern", 6))
                layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                               for i in range(int(get("num_hidden_layers")))]
        elif model_type in ("qwen2", "qwen3") and get("use_sliding_window", False):
            raise ValueError(f"use_sliding_window: Qwen's per-layer sliding window is not implemented "
                             f"({model_type} with use_sliding_window=True)")
        if layer_types and model_type not in ("mistral", "mixtral", "gemma2", "gemma3_text"):
            if any(t != "full_attention" for t in layer_types):
                raise ValueError(f"layer_types: only 'full_attention' layers are implemented for {model_type}, got "
                                 f"{sorted(set(layer_types))}")
        types = None
        if model_type in ("gemma2", "gemma3_text"):
            unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
            if unknown:
                raise ValueError(f"layer_types: {unknown} are not implemented; supported: {_LAYER_TYPES}")
            if sliding is None or "sliding_attention" not in layer_types:
                sliding = None
            elif "full_attention" in layer_types:
                types = tuple(layer_types)
        attention_bias = bool(get("attention_bias", False))
        softcap = get("attn_logit_softcapping", None) if model_type in ("gemma2", "gemma3_text") else None
        final_softcap = get("final_logit_softcapping", None) if model_type in ("gemma2", "gemma3_text") else None
        attn_scale = None
        if model_type in ("gemma2", "gemma3_text"):
            attn_scale = float(get("query_pre_attn_scalar")) ** -0.5
        elif model_type == "granite":
            attn_scale = float(get("attention_multiplier", 1.0))
        hidden = int(get("hidden_size"))
        embed_scale = None
        if gemma:
            embed_scale = hidden**0.5
        elif model_type == "granite" and float(get("embedding_multiplier", 1.0)) != 1.0:
            embed_scale = float(get("embedding_multiplier"))
        granite = model_type == "granite"
        experts = 0
        if model_type == "mixtral":
            experts = int(get("num_local_experts"))
            if float(get("router_jitter_noise", 0.0) or 0.0) != 0.0:
                raise ValueError(f"router_jitter_noise: {get('router_jitter_noise')} is not implemented (only 0)")
            if get("output_router_logits", False):
                raise ValueError("output_router_logits: the router's auxiliary loss is not implemented")
        return cls(
            model_type=model_type,
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
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
            qkv_bias=True if model_type == "qwen2" else (attention_bias and model_type != "phi3"),
            o_bias=attention_bias if model_type in ("llama", "qwen3", "olmo2", "granite", *_GEMMA) else False,
            mlp_bias=bool(get("mlp_bias", False)) if model_type in ("llama", "granite") else False,
            qk_norm=model_type in ("qwen3", "gemma3_text", "olmo2"),
            sliding_window=None if sliding is None else int(sliding),
            layer_types=types,
            rope_local_theta=local_theta,
            partial_rotary_factor=partial,
            hidden_act=_ACTIVATIONS[act],
            norm_style="gemma" if gemma else "olmo2" if model_type == "olmo2" else "llama",
            norm_placement=("sandwich" if model_type in ("gemma2", "gemma3_text") else
                            "post" if model_type == "olmo2" else "pre"),
            qk_norm_width="projection" if model_type == "olmo2" else "head",
            fused_qkv=model_type == "phi3",
            fused_gate_up=model_type == "phi3",
            embed_scale=embed_scale,
            attn_scale=attn_scale,
            attn_logit_softcap=None if softcap is None else float(softcap),
            final_logit_softcap=None if final_softcap is None else float(final_softcap),
            residual_multiplier=float(get("residual_multiplier", 1.0)) if granite else 1.0,
            logits_scaling=float(get("logits_scaling", 1.0)) if granite else 1.0,
            num_experts=experts,
            num_experts_per_tok=int(get("num_experts_per_tok", 2)) if experts else 2,
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
        if self.model_type == "phi3":
            rope["partial_rotary_factor"] = self.partial_rotary_factor
        kwargs["rope_parameters"] = rope
        mt = self.model_type
        if mt in ("llama", "granite"):
            kwargs.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif mt in ("mistral", "phi3", "mixtral"):
            kwargs["sliding_window"] = self.sliding_window
        if mt == "mixtral":
            kwargs.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
        elif mt in ("qwen3", "olmo2", *_GEMMA):
            kwargs["attention_bias"] = self.qkv_bias
        if mt == "gemma":
            kwargs["hidden_act"] = "gelu_pytorch_tanh"
        if mt in ("gemma2", "gemma3_text"):
            kwargs.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=round(self.attn_scale**-2),
                          attn_logit_softcapping=self.attn_logit_softcap,
                          final_logit_softcapping=self.final_logit_softcap,
                          sliding_window=self.sliding_window or 4096,
                          layer_types=list(self.layer_types or ["sliding_attention" if self.sliding_window else
                                                                "full_attention"] * self.num_layers))
        if mt == "gemma3_text":
            kwargs["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
                "rope_type": "default", "rope_theta": self.rope_local_theta or self.rope_theta}}
        if mt == "granite":
            kwargs.update(embedding_multiplier=self.embed_scale or 1.0, residual_multiplier=self.residual_multiplier,
                          attention_multiplier=self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5,
                          logits_scaling=self.logits_scaling)
        if mt == "phi3" and self.vocab_size <= 32000:  # Phi3Config's default pad_token_id is 32000
            kwargs["pad_token_id"] = None
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
