"""Sampling schedules: per-scale mask schedules and the classifier-free-guidance ramp.

A mask schedule has one entry per scale; entry k lists how many of scale k's pn**2
tokens are decided at each refinement step (official sampling_arg_util.mask_schedule
and HMAR.generate):
- step 0 is the next-scale prediction, which samples every token and keeps the
  entry[0] most confident ones; the others (sum(entry[1:])) are masked;
- step j >= 1 runs the masked-prediction model on the scale, resamples the masked
  positions, and keeps masked only the sum(entry[j+1:]) least confident of them.
So the entries must sum to pn**2; a single-element entry [pn**2] means next-scale only.

As text (config files, command lines) a schedule is JSON nested lists, 'none' (next-scale only) or
'default' (the official schedule of the 256 px scales).
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Sequence

from hmar_jax.models.config import PATCH_NUMS_256

# Official default for the 256 px pyramid (1, 2, 3, 4, 5, 6, 8, 10, 13, 16).
DEFAULT_MASK_SCHEDULE_256 = ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (36,), (64,), (100,), (169,), (256,))

MaskSchedule = tuple[tuple[int, ...], ...]


class ScheduleError(ValueError):
  """A mask schedule that does not fit the model's scales."""


def next_scale_only(patch_nums: Sequence[int]) -> MaskSchedule:
  """The schedule without masked refinement: every scale in one step."""
  return tuple((int(p) * int(p),) for p in patch_nums)


def validate_mask_schedule(schedule: Sequence[Sequence[int]] | None, patch_nums: Sequence[int]) -> MaskSchedule:
  """Checks a schedule against `patch_nums` and returns it as nested tuples.

  None or 'none' means next-scale only, 'default' the official 256 px schedule; other text is
  parsed as JSON. Raises ScheduleError naming the offending scale.
  """
  if isinstance(schedule, str):
    if schedule.strip().lower() == "default":
      if tuple(int(p) for p in patch_nums) != PATCH_NUMS_256:
        raise ScheduleError(
          f"mask schedule 'default' is the official one for the 256 px scales {PATCH_NUMS_256}, but the model "
          f"has scales {tuple(patch_nums)}: give the schedule as JSON nested lists, or 'none'"
        )
      return DEFAULT_MASK_SCHEDULE_256
    schedule = parse_mask_schedule(schedule)
  if schedule is None:
    return next_scale_only(patch_nums)
  schedule = list(schedule)
  if len(schedule) != len(patch_nums):
    raise ScheduleError(
      f"mask schedule has {len(schedule)} entries but the model has {len(patch_nums)} scales {tuple(patch_nums)}"
    )
  out = []
  for k, (entry, pn) in enumerate(zip(schedule, patch_nums)):
    if isinstance(entry, int):
      entry = (entry,)
    entry = tuple(entry)
    if not entry or any((not isinstance(n, int)) or isinstance(n, bool) or n < 1 for n in entry):
      raise ScheduleError(
        f"mask schedule entry for scale {k} ({pn}x{pn}) must be a non-empty list of positive "
        f"integers, got {list(entry)}"
      )
    if sum(entry) != pn * pn:
      raise ScheduleError(
        f"mask schedule entry for scale {k} ({pn}x{pn}) decides {sum(entry)} tokens "
        f"({list(entry)}), but the scale has {pn * pn}: the steps must sum to {pn * pn}"
      )
    out.append(entry)
  return tuple(out)


def parse_mask_schedule(text: str) -> list:
  """'[[1],[1,3],...]' -> nested lists; 'none' -> None (next-scale only). ('default' needs the
  model's scales: validate_mask_schedule.)"""
  text = text.strip()
  if text.lower() in ("", "none", "nsp"):
    return None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise ScheduleError(f"cannot parse mask schedule {text!r} as JSON nested lists: {e}") from None
  if not isinstance(value, list):
    raise ScheduleError(f"a mask schedule is a list of lists, got {text!r}")
  return value


def guidance_scale(cfg: float, si: int, num_scales: int) -> float:
  """Guidance strength t at scale si, ramped linearly: cfg * si / (S - 1) (official VAR/HMAR).

  Guided logits are (1 + t) * cond - t * uncond, so t = 0 is the conditional model alone.
  """
  if num_scales < 2:
    return float(cfg)
  return float(cfg) * si / (num_scales - 1)


def _number(value) -> float | None:
  """float(value) for a real scalar (Python, NumPy or 0-d array), None for anything else."""
  if isinstance(value, (bool, str)):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def check_sampling_options(*, cfg=0.0, top_k=0, top_p=0.0, mask_cfg=0.0, prefix: str = "") -> None:
  """Raises ValueError naming the first argument out of its range (`prefix` + name).

  cfg and mask_cfg >= 0 (0 = no guidance); top_k an int >= 0 (0 = off); top_p in [0, 1] (0 = off).
  The filter reads a negative top_k or top_p as 'off' and a top_p above 1 as 'keep all', so these
  would otherwise pass without a word.
  """
  for name, value in (("cfg", cfg), ("mask_cfg", mask_cfg)):
    x = _number(value)
    if x is None or not math.isfinite(x) or x < 0:
      raise ValueError(f"{prefix}{name} must be a number >= 0 (0 = no guidance), got {value!r}")
  try:
    k = None if isinstance(top_k, bool) else operator.index(top_k)
  except TypeError:
    k = None
  if k is None or k < 0:
    raise ValueError(f"{prefix}top_k must be an int >= 0 (0 = off), got {top_k!r}")
  p = _number(top_p)
  if p is None or not 0 <= p <= 1:
    raise ValueError(f"{prefix}top_p must be in [0, 1] (0 = off), got {top_p!r}")
