"""Zero-shot editing of an image under a mask: inpainting, outpainting, class-conditional editing.

  python -m hmar_jax.edit --params=runs/hmar_mask/params --tokenizer=runs/tokenizer/params \
      --image=photo.jpg --mask=mask.png --class_id=3 --mode=mask --seeds=4 --out=edit.png

--mask is an image (any size, resized like --image): white = regenerate, black = keep. Inpainting
is a white region inside the image, outpainting a white border around a black one, and
class-conditional editing any region with --class_id another class than the image's. --mode
'force' (VAR-style, any model) samples every scale as usual and forces the kept tokens to the
image's; 'mask' (HMAR-style, models with the masked-prediction branch) fills the region with the
masked-prediction branch, the kept tokens as its context (hmar_jax/sampling/editing.py). The image
and the mask are resized (shorter side) and centre-cropped to the tokenizer's resolution. The
output is one row per seed: the image, the mask over it, the edit.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from hmar_jax import cli
from hmar_jax.data.sources import CorruptImageError, resize_and_center_crop
from hmar_jax.image_grid import save_image_grid
from hmar_jax.sample import check_output_path, load_transformer
from hmar_jax.sampling import Sampler, check_sampling_options
from hmar_jax.sampling.editing import edit
from hmar_jax.sampling.schedules import parse_mask_schedule
from hmar_jax.tokenizer.vqvae import load_vqvae

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("params", None, "Trained transformer checkpoint directory (workdir/params).")
  flags.DEFINE_string("tokenizer", None, "VQVAE checkpoint directory.")
  flags.DEFINE_string("image", None, "The image to edit (any format PIL reads).")
  flags.DEFINE_string("mask", None, "The edit mask: white = regenerate, black = keep.")
  flags.DEFINE_integer("class_id", None, "Class of the regenerated region (num_classes = unconditional).")
  flags.DEFINE_enum("mode", "force", ["force", "mask"], "force: VAR-style; mask: HMAR-style.")
  flags.DEFINE_integer("seeds", 4, "How many edits (one batch, one output row each).")
  flags.DEFINE_integer("seed", 0, "PRNG seed of the batch (same seed, same edits).")
  flags.DEFINE_float("cfg", 1.5, "Classifier-free guidance at the last scale (linear ramp from 0).")
  flags.DEFINE_integer("top_k", 900, "Top-k filtering, >= 0 (0 = off).")
  flags.DEFINE_float("top_p", 0.96, "Top-p filtering, in [0, 1] (0 = off).")
  flags.DEFINE_string("mask_schedule", "none", "Per-scale mask schedule as JSON nested lists, 'none' or 'default'.")
  flags.DEFINE_string("out", "edit.png", "Output PNG: per seed, the image, the mask over it, the edit.")


def read_image(path: str, size: int) -> np.ndarray:
  """(size, size, 3) uint8: the file resized (shorter side to `size`, Lanczos) and centre-cropped."""
  try:
    with Image.open(path) as image:
      image.load()
      return resize_and_center_crop(image, size, mid_reso=1.0)
  except FileNotFoundError:
    raise FileNotFoundError(f"no such image file: {path!r}") from None
  except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
    raise CorruptImageError(f"cannot read image file {path!r}: {e}") from e


def read_mask(path: str, size: int) -> np.ndarray:
  """(size, size) bool, True = regenerate (white), resized and cropped as read_image."""
  regenerate = read_image(path, size).mean(axis=-1) >= 128
  if regenerate.all():
    raise ValueError(f"the mask {path!r} is white everywhere: nothing of the image would be kept")
  if not regenerate.any():
    raise ValueError(f"the mask {path!r} is black everywhere: nothing would be regenerated")
  return regenerate


def edit_image_file(
  model,
  vqvae,
  image_path: str,
  mask_path: str,
  out: str,
  *,
  class_id: int,
  mode: str = "force",
  seeds: int = 4,
  seed: int = 0,
  **sample_kwargs,
) -> str:
  """Edits one image file under one mask file `seeds` times (one batch drawn with `seed`); writes the
  PNG of rows (image, mask over it, edit) and returns its path. Bad inputs raise before anything is
  compiled."""
  check_output_path(out)
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")
  if not 0 <= class_id <= model.num_classes:
    raise ValueError(f"--class_id {class_id} is outside [0, {model.num_classes}] ({model.num_classes} = unconditional)")
  size = int(vqvae.image_size)
  image = read_image(image_path, size)
  regenerate = read_mask(mask_path, size)
  sampler = Sampler(model, vqvae)
  batch = np.broadcast_to(image.astype(np.float32) * (2 / 255) - 1, (seeds, size, size, 3))
  labels = np.full((seeds,), class_id, np.int32)
  edited, _, _ = edit(sampler, vqvae, batch, regenerate, labels, seed, edit_mode=mode, **sample_kwargs)
  shown = image.astype(np.float32) / 255
  shown_mask = np.where(regenerate[..., None], 0.5 * shown + 0.5, shown)  # the region, lightened
  rows = [x for e in np.asarray(edited) for x in (shown, shown_mask, e)]
  return save_image_grid(out, np.stack(rows), nrow=3)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  missing = [f"--{n}" for n in ("params", "tokenizer", "image", "mask", "class_id") if getattr(FLAGS, n) is None]
  if missing:
    raise app.UsageError(f"{', '.join(missing)} required")
  check_sampling_options(cfg=FLAGS.cfg, top_k=FLAGS.top_k, top_p=FLAGS.top_p, prefix="--")
  if FLAGS.mask_schedule.strip().lower() != "default":
    parse_mask_schedule(FLAGS.mask_schedule)
  check_output_path(FLAGS.out)
  for path in (FLAGS.image, FLAGS.mask):  # readable before the checkpoints load
    read_image(path, 8)
  t0 = time.time()
  path = edit_image_file(
    load_transformer(FLAGS.params),
    load_vqvae(FLAGS.tokenizer),
    FLAGS.image,
    FLAGS.mask,
    FLAGS.out,
    class_id=FLAGS.class_id,
    mode=FLAGS.mode,
    seeds=FLAGS.seeds,
    seed=FLAGS.seed,
    cfg=FLAGS.cfg,
    top_k=FLAGS.top_k,
    top_p=FLAGS.top_p,
    mask_schedule=FLAGS.mask_schedule,
  )
  print(f"wrote {FLAGS.seeds} edits to {path} in {time.time() - t0:.1f}s on {jax.devices()[0].platform}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
