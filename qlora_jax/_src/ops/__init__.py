"""Operations over quantized arrays: the dequantizing matmul."""

from qlora_jax._src.ops.qmatmul import qmatmul

__all__ = ["qmatmul"]
