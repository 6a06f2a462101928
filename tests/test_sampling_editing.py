"""Zero-shot editing: which tokens are kept at each scale, and that kept tokens stay the image's."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from sampling_helpers import tiny_transformer, tiny_vqvae

from hmar_jax import edit as edit_cli
from hmar_jax.sampling import Sampler
from hmar_jax.sampling.editing import edit, pixel_to_token_keep, scale_keep_masks
from hmar_jax.sampling.sampler import _share

SCHEDULE = [[1], [1, 3], [1, 2, 6], [25], [64]]  # for the tiny patch_nums (1, 2, 3, 5, 8)


@pytest.fixture(scope="module")
def vqvae():
  return tiny_vqvae(0)


@pytest.fixture(scope="module")
def hmar(vqvae):
  model = tiny_transformer("hmar", 1)
  return model, Sampler(model, vqvae)


@pytest.fixture(scope="module")
def images(vqvae):
  rng = np.random.default_rng(5)
  size = int(vqvae.image_size)
  return rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)


def _hole(size: int) -> np.ndarray:
  """(size, size) bool: a centred square, half the side, to regenerate (inpainting)."""
  regenerate = np.zeros((size, size), bool)
  regenerate[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
  return regenerate


def test_each_token_keeps_the_kept_share_of_its_pixels():
  regenerate = np.zeros((1, 8, 8), bool)
  regenerate[0, :4, :2] = True  # the top-left token (4 x 4 pixels) half regenerated
  keep = pixel_to_token_keep(regenerate, 2)
  np.testing.assert_allclose(keep[0], [[0.5, 1.0], [1.0, 1.0]])


def test_scale_keep_masks_match_pytorch_bilinear_resize_thresholded_at_a_half():
  rng = np.random.default_rng(0)
  token_keep = rng.uniform(size=(3, 16, 16))
  patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  masks = scale_keep_masks(token_keep, patch_nums)
  for pn, mask in zip(patch_nums, masks, strict=True):
    if pn * pn <= 3:  # VAR's demo keeps the image's tokens at the scales of at most 3 tokens
      assert mask.all()
      continue
    ref = torch.nn.functional.interpolate(
      torch.from_numpy(token_keep)[:, None], size=(pn, pn), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_array_equal(mask, ref > 0.5, err_msg=f"scale {pn}")


def test_a_schedule_count_is_scaled_to_the_regenerated_tokens_rounding_up():
  regenerated = jnp.asarray([64, 32, 1, 0])
  np.testing.assert_array_equal(_share(6, regenerated, 64), [6, 3, 1, 0])


@pytest.mark.parametrize("mode", ["force", "mask"])
def test_every_kept_token_is_the_source_images_token_and_the_hole_is_regenerated(hmar, vqvae, images, mode):
  model, sampler = hmar
  regenerate = _hole(images.shape[1])
  _, maps, keep = edit(
    sampler, vqvae, images, regenerate, [3, 7], 0, edit_mode=mode, mask_schedule=SCHEDULE, top_k=0, top_p=0.0
  )
  source = vqvae.encode_indices(jnp.asarray(images))
  changed = 0
  for si, (m, s, k) in enumerate(zip(maps, source, keep, strict=True)):
    m, s = np.asarray(m), np.asarray(s)
    np.testing.assert_array_equal(m[k], s[k], err_msg=f"{mode}: scale {si} changed a kept token")
    changed += int((m[~k] != s[~k]).sum())
  assert keep[-1].sum() < keep[-1].size  # the hole is there at the finest scale...
  assert changed > 0  # ...and sampled anew (a random model rarely redraws the image's tokens)


def test_the_two_modes_fill_the_hole_differently(hmar, vqvae, images):
  _, sampler = hmar
  regenerate = _hole(images.shape[1])
  got = {
    mode: edit(sampler, vqvae, images, regenerate, [3, 7], 0, edit_mode=mode, mask_schedule=SCHEDULE)[1][-1]
    for mode in ("force", "mask")
  }
  assert (np.asarray(got["force"]) != np.asarray(got["mask"])).any()


def test_hmar_style_editing_needs_the_masked_prediction_branch(vqvae, images):
  var = tiny_transformer("var", 2)
  with pytest.raises(ValueError, match="masked-prediction branch"):
    edit(Sampler(var, vqvae), vqvae, images, _hole(images.shape[1]), [0, 1], 0, edit_mode="mask")


def test_var_style_editing_keeps_the_kept_tokens_with_the_kv_cache(vqvae, images):
  var = tiny_transformer("var", 2)
  _, maps, keep = edit(Sampler(var, vqvae), vqvae, images, _hole(images.shape[1]), [0, 1], 0)
  source = vqvae.encode_indices(jnp.asarray(images))
  for m, s, k in zip(maps, source, keep, strict=True):
    np.testing.assert_array_equal(np.asarray(m)[k], np.asarray(s)[k])


def test_a_mask_of_another_size_than_the_images_is_refused(hmar, vqvae, images):
  _, sampler = hmar
  with pytest.raises(ValueError, match="edit mask"):
    edit(sampler, vqvae, images, np.zeros((8, 8), bool), [0, 1], 0)


def _save(path, array):
  Image.fromarray(array).save(path)
  return str(path)


def test_the_edit_png_shows_image_mask_and_edit_for_each_seed(hmar, vqvae, tmp_path):
  model, _ = hmar
  rng = np.random.default_rng(1)
  image = _save(tmp_path / "image.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
  mask = np.zeros((40, 48), np.uint8)
  mask[10:30, 12:36] = 255
  out = edit_cli.edit_image_file(
    model, vqvae, image, _save(tmp_path / "mask.png", mask), str(tmp_path / "edit.png"), class_id=2, seeds=2
  )
  size = int(vqvae.image_size)
  grid = np.asarray(Image.open(out))
  assert grid.shape == (2 * size + 3 * 2, 3 * size + 4 * 2, 3)  # 2 rows x 3 images, 2 px padding


@pytest.mark.parametrize("mask_value, message", [(255, "white everywhere"), (0, "black everywhere")])
def test_a_mask_that_keeps_nothing_or_regenerates_nothing_is_refused(hmar, vqvae, tmp_path, mask_value, message):
  model, _ = hmar
  image = _save(tmp_path / "image.png", np.zeros((16, 16, 3), np.uint8))
  mask = _save(tmp_path / "mask.png", np.full((16, 16), mask_value, np.uint8))
  with pytest.raises(ValueError, match=message):
    edit_cli.edit_image_file(model, vqvae, image, mask, str(tmp_path / "edit.png"), class_id=0)


def test_an_unreadable_image_file_is_named(hmar, vqvae, tmp_path):
  model, _ = hmar
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="broken.png"):
    edit_cli.edit_image_file(model, vqvae, str(bad), str(bad), str(tmp_path / "edit.png"), class_id=0)
