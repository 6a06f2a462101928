"""Block-sparse scale attention: plain-XLA reference, Pallas (TPU) and jax-triton (CUDA) kernels."""

from pallas_kernels.api import (
  IMPLEMENTATIONS,
  in_query_chunks,
  resolve_implementation,
  scale_attention,
  single_scale_attention,
)
from pallas_kernels.patterns import dense_mask, scale_ids, sequence_length
from pallas_kernels.reference import reference_attention
from pallas_kernels.tiling import tile_schedule, touched_tile_elements

__all__ = [
  "scale_attention",
  "single_scale_attention",
  "in_query_chunks",
  "resolve_implementation",
  "IMPLEMENTATIONS",
  "reference_attention",
  "dense_mask",
  "scale_ids",
  "sequence_length",
  "tile_schedule",
  "touched_tile_elements",
]
