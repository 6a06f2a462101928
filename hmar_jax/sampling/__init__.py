"""Sampling: top-k/top-p filtering, mask schedules, guidance ramp, the multi-scale sampler and MAR's sampler."""

from hmar_jax.sampling.filtering import sample_tokens, top_k_top_p_filter
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
  "MARSampler",
  "Sampler",
  "ScheduleError",
  "check_mar_sampling_options",
  "check_sampling_options",
  "guidance_scale",
  "next_scale_only",
  "sample_tokens",
  "top_k_top_p_filter",
  "validate_mask_schedule",
]
