"""Block-sparse scale attention: plain-XLA reference, Pallas (TPU) and jax-triton (CUDA) kernels."""
