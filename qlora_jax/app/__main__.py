"""`python -m qlora_jax.app ...` runs the `qlora-jax` command line."""

from qlora_jax.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
