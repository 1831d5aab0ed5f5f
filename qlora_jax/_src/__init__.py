"""Private implementation of qlora_jax; import from `qlora_jax` instead."""
