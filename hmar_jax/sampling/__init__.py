"""Sampling: top-k/top-p filtering, mask schedules, guidance ramp, the multi-scale sampler, MAR's and Hi-MAR's."""

from hmar_jax.sampling.filtering import sample_tokens, top_k_top_p_filter
from hmar_jax.sampling.himar_generate import HiMARSampler, check_himar_sampling_options
from hmar_jax.sampling.mar_generate import MARSampler, check_mar_sampling_options
from hmar_jax.sampling.sampler import Sampler
from hmar_jax.sampling.schedules import (
  DEFAULT_MASK_SCHEDULE_256,
  ScheduleError,
  check_sampling_options,
  guidance_scale,
  next_scale_only,
  validate_mask_schedule,
)

__all__ = [
  "DEFAULT_MASK_SCHEDULE_256",
  "HiMARSampler",
  "MARSampler",
  "Sampler",
  "ScheduleError",
  "check_himar_sampling_options",
  "check_mar_sampling_options",
  "check_sampling_options",
  "guidance_scale",
  "next_scale_only",
  "sample_tokens",
  "top_k_top_p_filter",
  "validate_mask_schedule",
]
