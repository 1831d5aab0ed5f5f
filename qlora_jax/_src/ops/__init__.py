"""Operations over quantized arrays: dequantizing products and their Pallas kernels."""

from qlora_jax._src.ops.pallas import Support, can_use_pallas_gpu, can_use_pallas_tpu
from qlora_jax._src.ops.qmatmul import PATHS, qdot_general, qeinsum, qmatmul, qmatmul_path

__all__ = ["PATHS", "Support", "can_use_pallas_gpu", "can_use_pallas_tpu", "qdot_general", "qeinsum", "qmatmul",
           "qmatmul_path"]
