"""Block-sparse scale attention: plain-XLA reference, Pallas (TPU) and jax-triton (CUDA) kernels."""
from pallas_kernels.api import scale_attention
from pallas_kernels.patterns import dense_mask, scale_ids, sequence_length
from pallas_kernels.reference import reference_attention

__all__ = ["scale_attention", "reference_attention", "dense_mask", "scale_ids", "sequence_length"]
