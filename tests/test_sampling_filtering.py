"""Top-k / top-p filtering, mask-schedule validation, guidance ramp and the PNG grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hmar_jax import image_grid
from hmar_jax.sampling import filtering, schedules


def _torch_official_filter(logits, top_k, top_p):
  """The official rule written with torch ops (models/helpers.sample_with_top_k_top_p_)."""
  torch = pytest.importorskip("torch")
  x = torch.tensor(logits)
  if top_k > 0:
    x = x.masked_fill(x < x.topk(top_k, dim=-1)[0].amin(dim=-1, keepdim=True), -torch.inf)
  if top_p > 0:
    s, i = x.sort(dim=-1, descending=False)
    rm = s.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    rm[..., -1:] = False
    x = x.masked_fill(rm.scatter(i.ndim - 1, i, rm), -torch.inf)
  return x.numpy()


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (5, 0.0), (0, 0.8), (7, 0.9), (50, 0.96), (64, 0.5)])
def test_filter_keeps_the_same_tokens_as_the_official_rule(top_k, top_p):
  logits = np.random.default_rng(0).normal(size=(3, 4, 64)).astype(np.float32) * 3
  got = np.asarray(filtering.top_k_top_p_filter(jnp.asarray(logits), top_k, top_p))
  want = _torch_official_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)])


def test_sampling_draws_only_kept_tokens_and_reports_their_probability():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 500, 16)).astype(np.float32))
  tokens, conf = filtering.sample_tokens(jax.random.key(0), logits, top_k=3)
  kept = np.asarray(filtering.top_k_top_p_filter(logits, 3)) > -np.inf
  assert np.take_along_axis(kept, np.asarray(tokens)[..., None], -1).all()
  probs = np.asarray(jax.nn.softmax(filtering.top_k_top_p_filter(logits, 3)))
  np.testing.assert_allclose(conf, np.take_along_axis(probs, np.asarray(tokens)[..., None], -1)[..., 0], rtol=1e-6)


PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def test_official_default_schedule_is_valid():
  assert schedules.validate_mask_schedule(schedules.DEFAULT_MASK_SCHEDULE_256, PN)[2] == (1, 1, 2, 5)
  assert schedules.validate_mask_schedule(None, (1, 2)) == ((1,), (4,))
  assert schedules.validate_mask_schedule("none", (1, 2)) == ((1,), (4,))
  assert schedules.validate_mask_schedule("[[1], [1, 3]]", (1, 2)) == ((1,), (1, 3))


def test_schedule_whose_steps_do_not_sum_to_the_scale_is_rejected_clearly():
  bad = [list(e) for e in schedules.DEFAULT_MASK_SCHEDULE_256]
  bad[2] = [1, 1, 2, 4]
  with pytest.raises(schedules.ScheduleError, match=r"scale 2 \(3x3\) decides 8 tokens.*must sum to 9"):
    schedules.validate_mask_schedule(bad, PN)


@pytest.mark.parametrize(
  "bad,msg",
  [([[1]] * 9, "9 entries but the model has 10"), ("[[1],[0,4]]", "positive integers"), ("[[1], [4", "cannot parse")],
)
def test_malformed_schedules_are_rejected(bad, msg):
  with pytest.raises(schedules.ScheduleError, match=msg):
    schedules.validate_mask_schedule(bad, PN if isinstance(bad, list) else (1, 2))


def test_guidance_ramps_linearly_from_zero_at_the_first_scale_to_cfg_at_the_last():
  ts = [schedules.guidance_scale(1.5, si, 10) for si in range(10)]
  np.testing.assert_allclose(ts, 1.5 * np.arange(10) / 9)


def test_grid_tiles_images_row_major_with_padding(tmp_path):
  imgs = np.zeros((3, 4, 5, 3), np.float32)
  imgs[1] = 1.0
  grid = image_grid.make_grid(imgs, nrow=2, padding=1)
  assert grid.shape == (1 + 2 * 5, 1 + 2 * 6, 3) and grid.dtype == np.uint8
  assert (grid[1:5, 7:12] == 255).all() and (grid[1:5, 1:6] == 0).all() and (grid[6:10, 1:6] == 0).all()
  path = image_grid.save_image_grid(tmp_path / "g.png", imgs, nrow=2, padding=1)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
