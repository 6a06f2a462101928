"""Sampling: top-k/top-p filtering, mask schedules, guidance ramp and the multi-scale sampler."""

from hmar_jax.sampling.filtering import sample_tokens, top_k_top_p_filter
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
  "Sampler",
  "ScheduleError",
  "check_sampling_options",
  "guidance_scale",
  "next_scale_only",
  "sample_tokens",
  "top_k_top_p_filter",
  "validate_mask_schedule",
]
