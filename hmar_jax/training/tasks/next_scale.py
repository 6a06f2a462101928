"""Next-scale prediction of VAR / HMAR (official nsp_trainer.py, trainer.py, train.py).

  python -m hmar_jax.train --config=configs/hmar.py:tiny --workdir=runs/hmar_nsp

Data: the training images tokenised once by the frozen VQVAE (hmar_jax/training/token_cache.py).
Each step forms the teacher-forcing inputs from the token maps on the device (the quantizer's
upsample-and-accumulate), then the loss: cross entropy per token weighted per scale ('uniform' =
VAR, 'equal' / 'lognorm' = HMAR), summed over tokens and averaged over the batch (official
`loss.mul(loss_weight).sum(-1).mean()`).

An HMAR model is trained here without its masked-prediction branch (config.model.mask_layers is
set to 0 for this task): next-scale training never touches it, so it takes no memory; masked
finetuning adds it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hmar_jax import checkpoint
from hmar_jax.models import layout
from hmar_jax.models.transformer import BLOCK_GROUPS, REMAT_AUTO, REMAT_AUTO_FALLBACK, ScaleTransformer
from hmar_jax.parallel.partitioning import logical_names_tree
from hmar_jax.sample import write_sample_grid
from hmar_jax.training import loss_weights as loss_weights_lib
from hmar_jax.training import token_cache
from hmar_jax.training.flops import transformer_step_flops
from hmar_jax.training.task import Task, TrainState
from hmar_jax.training.trees import flatten, merge_trees

PARAMS_KIND = "hmar_jax.scale_transformer"


def scale_slices(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
  bounds = np.cumsum([0] + [int(p) ** 2 for p in patch_nums])
  return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def split_maps(indices: jax.Array, patch_nums: Sequence[int]) -> list[jax.Array]:
  """(B, L) flat tokens -> [(B, pn, pn)] per scale."""
  return [indices[:, a:b].reshape(-1, p, p) for (a, b), p in zip(scale_slices(patch_nums), patch_nums, strict=True)]


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-position CE (..., V) x (...) -> (...), float32; torch CrossEntropyLoss(label_smoothing) semantics."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
  return nll


def nsp_metrics(logits: jax.Array, targets: jax.Array, patch_nums: Sequence[int], ce: jax.Array | None = None) -> dict:
  """Official logging: mean / last-scale CE and accuracy (%), and CE and accuracy per scale."""
  ce = cross_entropy(logits, targets) if ce is None else ce
  hit = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  tail = int(patch_nums[-1]) ** 2
  slices = scale_slices(patch_nums)
  return {
    "ce_mean": ce.mean(),
    "ce_tail": ce[:, -tail:].mean(),
    "acc_mean": 100 * hit.mean(),
    "acc_tail": 100 * hit[:, -tail:].mean(),
    "ce_per_scale": jnp.stack([ce[:, a:b].mean() for a, b in slices]),
    "acc_per_scale": jnp.stack([100 * hit[:, a:b].mean() for a, b in slices]),
  }


def nsp_loss(
  model: ScaleTransformer,
  batch: Mapping[str, jax.Array],
  key: jax.Array,
  weights: jax.Array,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict]:
  """Weighted next-scale cross entropy and its metrics.

  batch: 'labels' (B,) int, 'indices' (B, L) int targets, 'teacher_inputs' (B, L - first_l, Cvae).
  weights: (L,) per-token loss weights.
  """
  logits = model.nsp_logits(batch["labels"], batch["teacher_inputs"], train=True, key=key)
  ce = cross_entropy(logits, batch["indices"], label_smoothing)
  loss = jnp.mean(jnp.sum(ce * weights, axis=-1))
  plain = ce if not label_smoothing else None
  return loss, nsp_metrics(
    jax.lax.stop_gradient(logits),
    batch["indices"],
    model.patch_nums,
    None if plain is None else jax.lax.stop_gradient(plain),
  )


def read_params_for(directory: str, model_config: ml_collections.ConfigDict) -> dict:
  """A parameter checkpoint as host numpy, in `model_config`'s block layout (list or scan)."""
  tree = layout.to_layout(checkpoint.read_params_tree(directory), bool(model_config.scan_layers))
  return int_keys(tree)


def int_keys(tree):
  """Checkpoint list groups come back keyed '0', '1', ...; the model's pure dicts use ints."""
  if isinstance(tree, Mapping):
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): int_keys(v) for k, v in tree.items()}
  return tree


def overlay(fresh: Mapping, loaded: Mapping, source: str) -> dict:
  """`fresh` with every leaf that `loaded` has replaced (shapes must agree); leaves only in `loaded`
  are an error naming them."""
  want, got = flatten(fresh), flatten(loaded)
  unknown = sorted(set(got) - set(want))
  if unknown:
    raise ValueError(
      f"{source} has parameters this model lacks: {unknown[:8]}"
      + (f" ... ({len(unknown)})" if len(unknown) > 8 else "")
    )
  bad = [
    f"{k}: {tuple(np.shape(got[k]))} vs model {tuple(np.shape(want[k]))}"
    for k in got
    if tuple(np.shape(got[k])) != tuple(np.shape(want[k]))
  ]
  if bad:
    raise ValueError(f"{source} does not fit this model: " + "; ".join(bad[:8]))

  def walk(f, g):
    if isinstance(f, Mapping):
      return {k: walk(v, g[k]) if k in g else v for k, v in f.items()}
    return jnp.asarray(g, f.dtype)

  return walk(fresh, loaded)


class NextScaleTask(Task):
  """Next-scale prediction of a ScaleTransformer (config.model) over cached token maps."""

  name = "nsp"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    super().__init__(config, workdir)
    self.model_config = self.make_model_config(config)
    self.stacked_groups = BLOCK_GROUPS if self.model_config.scan_layers else ()
    self.patch_nums = tuple(int(p) for p in self.model_config.patch_nums)
    self.vqvae = token_cache.load_tokenizer(config)
    q_def, q_state = nnx.split(self.vqvae.quantizer)
    self._quantizer = (q_def, jax.tree.map(np.asarray, q_state))  # closed over as constants in the step
    # model.remat_policy 'auto': built without remat; leaner_step switches to the fallback policy.
    self._remat_fallback = REMAT_AUTO_FALLBACK if config.model.get("remat_policy") == REMAT_AUTO else None
    self._graphdef = self._model_graphdef()
    self._tokens = None

  # ---------------------------------------------------------------- model
  @staticmethod
  def make_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(config.model.to_dict())
    m.patch_nums = tuple(m.patch_nums)
    m.mask_layers = 0  # the masked branch is not trained here: do not allocate it
    return m

  def leaner_step(self) -> str | None:
    if self._remat_fallback is None:
      return None
    self.model_config.remat_policy, self._remat_fallback = self._remat_fallback, None
    self._graphdef = self._model_graphdef()  # the policy is part of the module's static structure
    return f"model.remat_policy={self.model_config.remat_policy!r}"

  def _model_graphdef(self):
    return nnx.graphdef(nnx.eval_shape(lambda: self.make_model(jax.random.key(0))))

  def make_model(self, key: jax.Array) -> ScaleTransformer:
    return ScaleTransformer(self.model_config, rngs=nnx.Rngs(params=key))

  def _split_model(self, key: jax.Array) -> tuple[dict, dict]:
    model = self.make_model(key)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
    return params, rest

  def init_variables(self, key, pretrained=None) -> dict:
    params, rest = self._split_model(key)
    if pretrained is not None:
      params = overlay(params, pretrained["params"], self.config.init_from)
    return {"params": params, "frozen": {}, "model_vars": rest, "extra": {}}

  def variable_names(self) -> dict:
    abstract = nnx.eval_shape(lambda: self.make_model(jax.random.key(0)))
    return {"params": logical_names_tree(nnx.state(abstract, nnx.Param))}

  def load_pretrained(self) -> dict | None:
    if not self.config.init_from:
      return None
    return {"params": read_params_for(self.config.init_from, self.model_config)}

  def model(self, params: Mapping, model_vars: Mapping | None = None) -> ScaleTransformer:
    """A module view of pure-dict parameters (inside or outside jit)."""
    if model_vars:
      return nnx.merge(self._graphdef, params, model_vars)
    return nnx.merge(self._graphdef, params)

  # ---------------------------------------------------------------- step
  def prepare_batch(self, batch, frozen) -> dict:
    q_def, q_state = self._quantizer
    q = nnx.merge(q_def, q_state)
    maps = split_maps(batch["indices"], self.patch_nums)
    return {"labels": batch["labels"], "indices": batch["indices"], "teacher_inputs": q.teacher_forcing_inputs(maps)}

  def loss(self, params, state, batch, key):
    weights = jnp.asarray(loss_weights_lib.token_loss_weights(self.patch_nums, self.config.loss.weighting))
    loss, metrics = nsp_loss(
      self.model(params, state.model_vars), batch, key, weights, float(self.config.loss.label_smoothing)
    )
    return loss, metrics, {}

  # ---------------------------------------------------------------- data
  def tokens(self) -> token_cache.TokenCacheSource:
    """The token cache (memory-mapped chunks): records {'indices': (L,) int32, 'labels': () int32}."""
    if self._tokens is None:
      self._tokens = token_cache.cached_tokens(self.config, self.workdir, self.vqvae)
    return self._tokens

  def train_source(self):
    return self.tokens()

  def example_shapes(self) -> dict[str, tuple[int, ...]]:
    return {"indices": (sum(p * p for p in self.patch_nums),), "labels": ()}

  # ---------------------------------------------------------------- accounting
  def step_flops(self, batch_size: int) -> float:
    return transformer_step_flops(self.model_config, images=batch_size)

  def tokens_per_example(self) -> int:
    return sum(p * p for p in self.patch_nums)

  def progress_fields(self) -> tuple[str, ...]:
    return ("ce_mean", "acc_mean")

  # ---------------------------------------------------------------- end of training
  def final_params(self, host: Mapping) -> dict:
    """The weights to save: the EMA when kept, else the trained ones (plus any frozen ones)."""
    params = host["ema_params"] if "ema_params" in host else host["params"]
    return merge_trees(params, host["frozen"]) if host["frozen"] else dict(params)

  def finish(self, state: TrainState, host, *, primary: bool) -> dict:
    out = {}
    params = self.final_params(host)
    path = os.path.join(self.workdir, "params")
    if primary:
      if os.path.exists(path):
        shutil.rmtree(path)
      checkpoint.save_params(
        path,
        params,
        metadata={
          "kind": PARAMS_KIND,
          "model": self.model_config.to_dict(),
          "step": int(host["step"]),
          "task": self.config.task,
        },
      )
    out["params"] = path
    s = self.config.sample
    out["samples"] = None
    if s.grid_at_end and primary:
      model = self.model(jax.tree.map(jnp.asarray, params))
      out["samples"] = write_sample_grid(
        model,
        self.vqvae,
        os.path.join(self.workdir, "samples.png"),
        per_class=int(s.per_class),
        cfg=float(s.cfg),
        top_k=int(s.top_k),
        top_p=float(s.top_p),
        mask_schedule=s.mask_schedule,
        seed=int(s.seed),
      )
    return out
