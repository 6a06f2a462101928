"""hmar_jax: HMAR and VAR in JAX/Flax NNX."""
