"""Class-conditional multi-scale sampling for HMAR and VAR (official HMAR.generate, VAR
autoregressive_infer_cfg).

For each scale si (coarse to fine):
1. next-scale step: the model predicts all pn**2 tokens of scale si from the accumulated
   reconstruction (HMAR: from that scale's input alone, no cache; VAR: with a KV cache of
   the earlier scales). Classifier-free guidance runs the batch twice (class, null class)
   and mixes logits as (1 + t) * cond - t * uncond with t = cfg * si / (S - 1).
   Tokens are drawn after top-k / top-p filtering.
2. masked refinement (HMAR, when the scale's schedule entry has several steps): the
   sum(entry[1:]) least confident tokens (probability of the drawn token under the filtered
   distribution) are masked; each following step runs the masked-prediction branch on
   (f_hat at scale si, the scale's contribution with masked positions replaced by the mask
   embedding), resamples the masked positions, and keeps masked only the sum(entry[j+1:])
   least confident of them.
3. the scale's tokens are added to f_hat, which gives the next scale's input. This runs inside the
   next scale's step program (one program per scale, not two; the last scale's is its own).

Every per-scale function is jit-compiled once per (scale, batch size) and reused for
any schedule, cfg, top_k, top_p and seed (the masked-token counts are traced values, the masks
boolean arrays of static shape). The same seed gives the same samples.

Deviation: the official masked steps use guidance t = cfg * 1e-6 with a doubled batch
(effectively no guidance); here `mask_cfg` (default 0) is the constant guidance of the
masked steps, and with 0 they run on the conditional batch alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import gc
import inspect
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hmar_jax.compile_options import check_autotune_level, gpu_compiler_options
from hmar_jax.sampling import program_cache
from hmar_jax.sampling.filtering import sample_tokens
from hmar_jax.sampling.schedules import check_sampling_options, guidance_scale, validate_mask_schedule


def _least_confident(confidence: jax.Array, candidates: jax.Array, count: jax.Array) -> jax.Array:
  """Bool (B, n): the `count` lowest-confidence positions among `candidates` (ties: lower index).

  count: () or (B,) int (one count per row)."""
  score = jnp.where(candidates, confidence, jnp.inf)
  rank = jnp.argsort(jnp.argsort(score, axis=-1, stable=True), axis=-1, stable=True)
  count = jnp.asarray(count)
  return candidates & (rank < (count[:, None] if count.ndim == 1 else count))


def _share(scheduled: int, regenerated: np.ndarray, total: int) -> np.ndarray:
  """(B,) int32: a schedule's token count for the whole scale (`scheduled` of `total`) scaled to the
  `regenerated` (B,) positions of each row, rounded up (= `scheduled` when every position is).
  On the host: counts are known before a scale is sampled, and eager device ops compile one by one."""
  return ((scheduled * np.asarray(regenerated, np.int64) + total - 1) // total).astype(np.int32)


def _force(tokens: jax.Array, regenerate: jax.Array, known: jax.Array) -> jax.Array:
  """(B, n): the sampled tokens where `regenerate`, the known ones elsewhere."""
  return jnp.where(regenerate, tokens, known)


# Latent positions the tokenizer's decoder takes at a time by default: 16 images of a 16 x 16 grid
# (256 px). The decoder's full-resolution activations grow with the pixels decoded together; at
# 1024 px four whole images made the decode program the sampler's largest by far (7.5 GiB of
# temporaries compiled for the CPU, against 1.8 GiB for the largest next-scale step).
DECODE_LATENTS = 16 * 16 * 16


# XLA's GEMM / convolution autotuning level for the sampler's programs on CUDA GPUs (see
# hmar_jax/compile_options.py; None leaves XLA's default, 4, or XLA_FLAGS' in place). Level 1 tunes
# the same kernels without the scratch and reference buffers of levels 2-4, which set a first run's
# peak: HMAR d16 at 1024 px peaked at 14.4 GiB instead of 18.6 at the same speed on an H200; level 0
# leaves the kernels untuned and sampled far slower (bench/results/sample.json).
DEFAULT_GPU_AUTOTUNE_LEVEL: int | None = 1

# Whether XLA may emit the sampler's matmuls as Triton GEMM fusions on CUDA GPUs (None: XLA's default,
# on). Off, they go to cuBLAS: HMAR d16 at 256 px, batch 64, compiled in 43.7 s instead of 71.1 s
# (autotuning compiled 479 Triton kernels for the next-scale steps alone) and sampled at 266.5 instead
# of 256.0 img/s on an H200 (bench/results/sample.json).
DEFAULT_GPU_TRITON_GEMM: bool | None = False


def _is_abstract(state) -> bool:
  """True when the weights are shapes only (ShapeDtypeStructs, as nnx.eval_shape builds them)."""
  return any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(state))


def default_decode_chunk(side: int) -> int:
  """Images per decode chunk for a side x side token grid: DECODE_LATENTS // side^2, at least 1."""
  return max(1, DECODE_LATENTS // (int(side) * int(side)))


@contextlib.contextmanager
def gc_paused():
  """Python's cyclic garbage collector off for the block (and back on after, if it was on).

  Tracing makes many short-lived objects, and the collector's periodic passes over the whole heap
  (JAX's and Flax's objects included) took a fifth to a quarter of the sampler's lowering pass:
  HMAR d16's 16 programs traced in 2.05-2.27 s without them, 2.54-3.28 s with (2 CPU cores).
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


class Sampler:
  """Samples images from a trained ScaleTransformer and the VQVAE it was trained on.

  Args:
    model: hmar_jax.models.ScaleTransformer (HMAR with a masked branch, HMAR, or VAR).
    vqvae: hmar_jax.tokenizer.vqvae.VQVAE (its quantizer turns tokens into the next input,
      its decoder turns f_hat into pixels).
    use_kv_cache: None = VAR-style KV cache for block-causal models, per-scale Markov steps
      for block-diagonal (HMAR) ones; True forces the cached path (VAR mode) for any model.
    decode_dtype: compute dtype of the tokenizer's decoder ('float32', 'bfloat16'); None = the
      transformer's compute dtype. bfloat16 decodes about twice as fast on GPUs; pixels differ
      from a float32 decode by a few 1/255 steps at most on trained weights.
    decode_chunk: images decoded at a time (the decoder's activations at full resolution dominate
      the sampler's peak memory); None = as many as hold DECODE_LATENTS latent positions (16 at
      256 px, 4 at 512 px, 1 at 1024 px), so the decoder's activations per chunk do not grow with
      the resolution. A batch that is not a multiple is padded up to one (the padding is dropped).
    gpu_autotune_level: XLA's autotuning level for this sampler's programs on CUDA GPUs (0-4, see
      hmar_jax/compile_options.py; None = XLA's default). Autotuning times candidate kernels for each
      matmul and convolution while compiling: most of a first run's compile time.
    gpu_triton_gemm: whether XLA may emit matmuls as Triton kernels on CUDA GPUs (None = XLA's
      default); off by default: cuBLAS kernels, tuned without compiling dozens of Triton tilings each.
    program_cache: a folder where `precompile` keeps the programs it compiled and finds them again in
      a later process, which then skips tracing as well as compiling (hmar_jax/sampling/
      program_cache.py; `sampler_from_checkpoints` uses one inside JAX's persistent compilation
      cache); None = none.
  """

  def __init__(
    self,
    model,
    vqvae,
    *,
    use_kv_cache: bool | None = None,
    decode_dtype: str | None = None,
    decode_chunk: int | None = None,
    gpu_autotune_level: int | None = DEFAULT_GPU_AUTOTUNE_LEVEL,
    gpu_triton_gemm: bool | None = DEFAULT_GPU_TRITON_GEMM,
    program_cache: str | None = None,
  ):
    check_autotune_level("gpu_autotune_level", gpu_autotune_level)
    if gpu_triton_gemm is not None and not isinstance(gpu_triton_gemm, bool):
      raise ValueError(f"gpu_triton_gemm must be True, False or None (XLA's default), got {gpu_triton_gemm!r}")
    q = vqvae.quantizer
    if tuple(q.patch_nums) != tuple(model.patch_nums):
      raise ValueError(f"tokenizer patch_nums {tuple(q.patch_nums)} != model patch_nums {tuple(model.patch_nums)}")
    if q.vocab_size != model.vocab_size or q.z_channels != model.cvae:
      raise ValueError(
        f"tokenizer (V={q.vocab_size}, Cvae={q.z_channels}) does not match the model "
        f"(V={model.vocab_size}, Cvae={model.cvae})"
      )
    self.patch_nums = tuple(model.patch_nums)
    self.num_classes = int(model.num_classes)
    self.has_mask_branch = bool(getattr(model, "mask_layers", 0))
    self.use_kv_cache = (model.pattern == "block_causal") if use_kv_cache is None else bool(use_kv_cache)
    if not self.use_kv_cache and model.pattern != "block_diagonal":
      raise ValueError("a block-causal (VAR) model can only be sampled with the KV cache")
    self._model_def, self._model_state = nnx.split(model)
    self._vq_def, self._vq_state = nnx.split(vqvae)
    self.side = int(q.side)
    self.cvae = int(q.z_channels)
    self.decode_dtype = jnp.dtype(getattr(model, "dtype", jnp.float32) if decode_dtype is None else decode_dtype)
    if not jnp.issubdtype(self.decode_dtype, jnp.floating):
      raise ValueError(f"decode_dtype must be a float dtype, got {decode_dtype!r}")
    if decode_chunk is None:
      decode_chunk = default_decode_chunk(self.side)
    if decode_chunk < 1:
      raise ValueError(f"decode_chunk must be >= 1, got {decode_chunk}")
    self.decode_chunk = int(decode_chunk)
    self.gpu_autotune_level = gpu_autotune_level
    self.gpu_triton_gemm = gpu_triton_gemm
    self._jit = {}
    # (piece name, static kwargs) -> [executables compiled ahead by `precompile`], one per argument shapes
    self._aot = {}
    self._placement = None  # the sharding of `place`, which weights swapped in later get too
    # `load_weights_in_background`'s load: the callable until started, then its future
    self._pending = None
    self._lowering_pass = False  # True on `_lower_all`'s copy, which runs on shapes only
    self.program_cache = program_cache
    # The last `precompile`: its programs, whether read from `program_cache`, and its phases' seconds.
    self.precompile_report: dict = {}
    self._program_cache_write = None  # the future of the last write to `program_cache`

  def update_model(self, model) -> None:
    """Swaps in another model's weights (same architecture) without recompiling anything."""
    self._swap_in_pending()
    self._model_state = self._placed(self._state_of(model, self._model_def, "update_model", "model"))

  def place(self, sharding) -> None:
    """Puts the model's and the tokenizer's weights on `sharding` (e.g. replicated over a mesh of
    the local devices, so that a batch split over that mesh is sampled on all of them). Weights
    still abstract, or read in the background, are placed there when they arrive."""
    self._placement = sharding
    self._model_state, self._vq_state = self._placed(self._model_state), self._placed(self._vq_state)

  def load_weights_in_background(self, load: Callable[[], tuple]) -> None:
    """Has `load() -> (model, vqvae)` run in a thread; the sampler's weights are swapped for theirs (and
    placed as `place` said) when a sample first needs them. Meanwhile `precompile` compiles against
    the weights the sampler was made with, which may be abstract (nnx.eval_shape modules).

    The thread starts once `precompile` has traced every program and its compiler threads run
    (they release Python's lock; tracing does not, and reading a checkpoint beside it slowed both),
    or when a sample first needs the weights if nothing is precompiled. An error of `load` is
    raised by the call that waits for it."""
    self._swap_in_pending()
    self._pending = load

  def _start_pending(self) -> None:
    """Starts the background load given to `load_weights_in_background`, if not started yet."""
    if callable(self._pending):
      pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sampler-weights")
      self._pending = pool.submit(self._pending)
      pool.shutdown(wait=False)

  def _ready(self) -> None:
    """Waits for weights being read in the background and swaps them in; refuses to sample without
    weights (a sampler made from abstract modules, given none)."""
    if self._lowering_pass:
      return
    self._swap_in_pending()
    if _is_abstract((self._model_state, self._vq_state)):
      raise ValueError(
        "the sampler's weights are shapes only (abstract modules): give it weights with update_model or "
        "load_weights_in_background before sampling"
      )

  def _swap_in_pending(self) -> None:
    self._start_pending()
    if self._pending is not None:
      pending, self._pending = self._pending, None
      model, vqvae = pending.result()
      self._model_state = self._placed(self._state_of(model, self._model_def, "the background load", "model"))
      self._vq_state = self._placed(self._state_of(vqvae, self._vq_def, "the background load", "tokenizer"))

  @staticmethod
  def _state_of(module, graphdef, who: str, what: str):
    other, state = nnx.split(module)
    if other != graphdef:
      raise ValueError(f"{who} needs a {what} of the same architecture as the sampler's")
    return state

  def _placed(self, state):
    """`state` on the sampler's placement (abstract leaves get it as their sharding), or as it is."""
    if self._placement is None:
      return state
    if _is_abstract(state):
      return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._placement), state)
    return jax.device_put(state, self._placement)

  # ------------------------------------------------------------------ compiled pieces
  def _compiled(self, name, fn, static_argnames=(), donate_argnames=()):
    piece = self._compiled_jit(name, fn, static_argnames, donate_argnames)
    if not self._aot:
      return piece

    def call(*args, **static):
      for compiled in self._aot.get((name, tuple(sorted(static.items()))), ()):
        try:
          return compiled(*args)
        except (TypeError, ValueError):  # other shapes or placements than this one was compiled for
          pass
      return piece(*args, **static)  # none fits: the jitted path

    return call

  def precompile(self, labels, *, workers: int = 8, **sample_kwargs) -> int:
    """Compiles every program one `sample(labels, ...)` call runs, side by side in `workers` threads
    (XLA compiles outside Python's lock), so a first call does not compile them one after another.
    With a `program_cache` holding them from an earlier process, reads them from there instead, with
    no tracing and no compiling; otherwise writes them there, in a background thread, once compiled.

    labels: (B,) the batch to come (its shape and sharding); sample_kwargs: as `sample_indices`
    (the mask schedule decides which programs exist; cfg, top-k, top-p and seed do not). Later calls
    of other shapes compile as usual. The weights may still be abstract (a Sampler of nnx.eval_shape
    modules, see `load_weights_in_background`): only their shapes and placements are read. Returns
    the number of programs compiled or read; `precompile_report` says which, and how long each phase took.
    """
    labels = jnp.asarray(labels, jnp.int32) if not isinstance(labels, jax.Array) else labels
    t0 = time.perf_counter()
    # Programs spread over several processes' devices are not kept: each process would hold a part.
    local = getattr(labels.sharding, "is_fully_addressable", True)
    key = self._program_cache_key(labels, sample_kwargs) if self.program_cache and local else None
    programs = None
    if key and program_cache.has(self.program_cache, key):
      self._start_pending()  # no tracing to share Python's lock with: the weights are read meanwhile
      programs = program_cache.load(self.program_cache, key)
    t_read = time.perf_counter()
    if programs is not None:
      for program_key, compiled in programs:
        self._aot.setdefault(program_key, []).append(compiled)
      self.precompile_report = {"programs": len(programs), "from_program_cache": True, "read_s": t_read - t0}
      return len(programs)
    jobs = self._lower_all(labels, sample_kwargs)
    t_traced = time.perf_counter()
    self._start_pending()  # the weights are read while the programs compile
    with concurrent.futures.ThreadPoolExecutor(max(1, int(workers))) as pool:
      done = list(pool.map(lambda job: (job[0][:2], *program_cache.compile_noting_cache_reads(job[1])), jobs.items()))
    for program_key, compiled, _ in done:
      self._aot.setdefault(program_key, []).append(compiled)
    self.precompile_report = {
      "programs": len(done),
      "from_program_cache": False,
      "read_s": t_read - t0,
      "trace_s": t_traced - t_read,
      "compile_s": time.perf_counter() - t_traced,
    }
    if key:
      writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="program-cache-write")
      self._program_cache_write = writer.submit(program_cache.save, self.program_cache, key, done)
      writer.shutdown(wait=False)
    return len(done)

  def _program_cache_key(self, labels: jax.Array, sample_kwargs: dict) -> str:
    """The `program_cache` key of `precompile(labels, **sample_kwargs)`'s programs: everything their
    code and shapes depend on (program_cache.environment() adds the source, versions and devices)."""
    options = {
      name: p.default
      for name, p in inspect.signature(Sampler.sample_indices).parameters.items()
      if p.default is not inspect.Parameter.empty
    }
    options.update(sample_kwargs)
    for traced in ("cfg", "top_k", "top_p"):  # passed to the programs as arrays: any value, same programs
      options.pop(traced)
    options["mask_cfg"] = bool(options["mask_cfg"])  # decides only whether the masked steps are guided
    options["mask_schedule"] = validate_mask_schedule(options["mask_schedule"], self.patch_nums)
    for edit in ("known", "keep"):
      options[edit] = None if options[edit] is None else program_cache.spec_text(options[edit])
    settings = {
      name: getattr(self, name)
      for name in ("use_kv_cache", "decode_dtype", "decode_chunk", "gpu_autotune_level", "gpu_triton_gemm")
    }
    return program_cache.key_of(
      {
        "sampler": program_cache.structure_text(settings),
        "models": [program_cache.structure_text(self._model_def), program_cache.structure_text(self._vq_def)],
        "weights": program_cache.spec_text((self._model_state, self._vq_state)),
        "labels": program_cache.spec_text(labels),
        "options": program_cache.structure_text(sorted(options.items())),
      }
    )

  def _lower_all(self, labels: jax.Array, sample_kwargs: dict) -> dict:
    """{(piece name, static kwargs, argument shapes): jax.stages.Lowered} of every program
    `sample(labels, ...)` runs.

    One pass of `sample_indices` and `decode` in which each piece is lowered for the arguments it
    is given (the weights as they are placed, batch-leading arrays like the labels, everything else
    uncommitted) and returns the shapes of its results to the next: each program is traced once
    and nothing runs. Tracing holds Python's lock, so this is done before the threads compile.
    """
    batch, label_sharding = labels.shape[0], getattr(labels, "sharding", None)
    weights = (self._model_state, self._vq_state)

    def spec(x):
      if any(x is w for w in weights):  # the weights with their own placements
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), x)

      def one(t):
        batched = t.ndim and t.shape[0] in (batch, 2 * batch) and label_sharding is not None
        return jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=label_sharding if batched else None)

      return jax.tree.map(one, x)

    lowered: dict = {}
    pass_ = copy.copy(self)
    pass_._aot, pass_._pending, pass_._lowering_pass = {}, None, True

    def lowering(name, fn, static_argnames=(), donate_argnames=()):
      jitted = self._compiled_jit(name, fn, static_argnames, donate_argnames)

      def call(*args, **static):
        specs = [spec(x) for x in args]
        shapes = tuple((s.shape, str(s.dtype)) for s in jax.tree.leaves(specs))
        key = (name, tuple(sorted(static.items())), shapes)
        if key not in lowered:
          lowered[key] = jitted.lower(*specs, **static)
        return lowered[key].out_info

      return call

    pass_._compiled = lowering
    model = nnx.merge(self._model_def, self._model_state) if self.use_kv_cache else None
    pass_._empty_cache = lambda rows, labels: jax.eval_shape(lambda: model.init_cache(rows))
    with gc_paused():
      _, f_hat = Sampler.sample_indices(pass_, labels, jax.random.key(0), **sample_kwargs)
      Sampler.decode(pass_, f_hat)
    return lowered

  def _empty_cache(self, batch: int, labels) -> list[dict] | dict:
    """The model's empty KV cache for `batch` rows, split over the devices like the labels' batch:
    made in place on each device, never whole on one (at 8 GPUs x 64 images, a d24 cache is 100 GB)."""
    model = nnx.merge(self._model_def, self._model_state)
    sharding = getattr(labels, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.is_fully_replicated:
      return model.init_cache(batch)
    split = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
    key = ("empty_cache", batch, split)
    if key not in self._jit:  # init_cache reads the model's config only, never its weights
      self._jit[key] = jax.jit(
        lambda: model.init_cache(batch),
        out_shardings=split,
        compiler_options=self._compiler_options(),
      )
    return self._jit[key]()

  def _compiler_options(self):
    return gpu_compiler_options(self.gpu_autotune_level, self.gpu_triton_gemm)

  def _compiled_jit(self, name, fn, static_argnames=(), donate_argnames=()):
    if name not in self._jit:
      self._jit[name] = jax.jit(
        fn,
        static_argnames=static_argnames,
        donate_argnames=donate_argnames,
        compiler_options=self._compiler_options(),
      )
    return self._jit[name]

  def _guided_sample(self, logits2, key, t, top_k, top_p):
    b = logits2.shape[0] // 2
    logits = (1.0 + t) * logits2[:b] - t * logits2[b:]
    return sample_tokens(key, logits, top_k, top_p)

  def _scale_input(self, vq_state, f_hat, prev_tokens, si):
    """(f_hat with scale si - 1's tokens added, scale si's input doubled for guidance, the (B, pn, pn)
    map of scale si - 1); at si == 0 (nothing to add) (None, None, None)."""
    if si == 0:
      return None, None, None
    f_hat, x, prev_map = self._update_fn(vq_state, f_hat, prev_tokens, si=si - 1)
    return f_hat, jnp.concatenate([x, x], axis=0), prev_map

  def _nsp_step_fn(self, model_state, vq_state, labels2, f_hat, prev_tokens, key, t, top_k, top_p, *, si):
    """Scale si's next-scale step, after adding scale si - 1's tokens to f_hat (one program per scale,
    not two). Returns (tokens, confidence, f_hat, the (B, pn, pn) map of scale si - 1): the last two
    None at si == 0."""
    model = nnx.merge(self._model_def, model_state)
    f_hat, x2, prev_map = self._scale_input(vq_state, f_hat, prev_tokens, si)
    logits2 = model.nsp_scale_logits(si, labels2, x2)
    return (*self._guided_sample(logits2, key, t, top_k, top_p), f_hat, prev_map)

  def _nsp_cached_step_fn(self, model_state, vq_state, labels2, f_hat, prev_tokens, cache, key, t, top_k, top_p, *, si):
    """`_nsp_step_fn` with VAR's KV cache (donated, returned updated after the others)."""
    model = nnx.merge(self._model_def, model_state)
    f_hat, x2, prev_map = self._scale_input(vq_state, f_hat, prev_tokens, si)
    logits2, cache = model.nsp_scale_logits_cached(si, labels2, x2, cache)
    return (*self._guided_sample(logits2, key, t, top_k, top_p), f_hat, prev_map, cache)

  def _mask_step_fn(
    self, model_state, vq_state, labels, f_hat, tokens, mask, keep_masked, key, t, top_k, top_p, *, si, guided
  ):
    model = nnx.merge(self._model_def, model_state)
    q = nnx.merge(self._vq_def, vq_state).quantizer
    teacher_in, contrib = q.mask_step_inputs(si, f_hat, tokens)
    if guided:
      null = jnp.full_like(labels, self.num_classes)
      two = lambda a: jnp.concatenate([a, a], axis=0)
      logits2 = model.mp_scale_logits(si, jnp.concatenate([labels, null]), two(teacher_in), two(contrib), two(mask))
      new, conf = self._guided_sample(logits2, key, t, top_k, top_p)
    else:
      new, conf = sample_tokens(key, model.mp_scale_logits(si, labels, teacher_in, contrib, mask), top_k, top_p)
    tokens = jnp.where(mask, new, tokens)
    return tokens, _least_confident(conf, mask, keep_masked)

  def _update_fn(self, vq_state, f_hat, tokens, *, si):
    """(f_hat, the next scale's input, the scale's (B, pn, pn) token map)."""
    q = nnx.merge(self._vq_def, vq_state).quantizer
    pn = self.patch_nums[si]
    return (*q.update_fhat(si, f_hat, tokens), tokens.reshape(tokens.shape[0], pn, pn))

  def _decode_fn(self, vq_state, f_hat):
    dtype = self.decode_dtype
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    vq = nnx.merge(self._vq_def, jax.tree.map(cast, vq_state))

    def decode(f):
      return ((vq.fhat_to_image(f.astype(dtype)) + 1.0) * 0.5).astype(jnp.float32)

    b, chunk = f_hat.shape[0], self.decode_chunk
    if b <= chunk:
      return decode(f_hat)
    pad = -b % chunk
    if pad:  # zero latents decode to something; those images are dropped below
      f_hat = jnp.concatenate([f_hat, jnp.zeros((pad, *f_hat.shape[1:]), f_hat.dtype)])
    images = jax.lax.map(decode, f_hat.reshape(-1, chunk, *f_hat.shape[1:]))  # one chunk at a time
    return images.reshape(-1, *images.shape[2:])[:b]

  # ------------------------------------------------------------------ public API
  def sample_indices(
    self,
    labels,
    key,
    *,
    cfg: float = 1.5,
    top_k: int = 900,
    top_p: float = 0.96,
    mask_schedule: Sequence[Sequence[int]] | str | None = None,
    mask_cfg: float = 0.0,
    known: Sequence[jax.Array] | None = None,
    keep: Sequence[jax.Array] | None = None,
    edit_mode: str = "force",
  ) -> tuple[list[jax.Array], jax.Array]:
    """Token maps and f_hat for `labels`; with `known` and `keep`, an edit of known token maps.

    Args:
      labels: (B,) int class ids (num_classes = unconditional).
      key: PRNG key (jax.random.key or PRNGKey) or an int seed.
      cfg: guidance strength at the last scale (ramped linearly from 0 at the first), >= 0.
      top_k: keep the k most likely tokens (0 = off), >= 0.
      top_p: nucleus mass in [0, 1] (0 = off).
      mask_schedule: per-scale token counts per refinement step (see schedules.py); None =
        next-scale only. Multi-step entries need a model with a masked-prediction branch.
      mask_cfg: guidance of the masked steps (official: ~0), >= 0.
      known: [(B, pn, pn) int] per scale: the token maps of the images being edited (zero-shot
        editing, see hmar_jax/sampling/editing.py); keep: [(B, pn, pn) bool] per scale, True where
        the known token stays. Kept tokens are never resampled. edit_mode:
        'force' (VAR-style): every scale is sampled as usual, then its kept tokens are forced to
          the known ones (masked refinement, if scheduled, resamples only the others);
        'mask' (HMAR-style, needs the masked-prediction branch): after the next-scale step the kept
          tokens are the unmasked context and the others start masked; masked-prediction steps fill
          them, least confident last, in as many steps as the scale's schedule entry has (at least one).
    Returns:
      ([(B, pn, pn) int32] per scale, f_hat (B, h, w, Cvae)).
    Raises ValueError naming an argument out of range, before anything is compiled.
    """
    check_sampling_options(cfg=cfg, top_k=top_k, top_p=top_p, mask_cfg=mask_cfg)
    schedule = validate_mask_schedule(mask_schedule, self.patch_nums)
    if any(len(e) > 1 for e in schedule) and not self.has_mask_branch:
      raise ValueError(
        "this mask schedule refines some scales in several steps, but the model has no "
        "masked-prediction branch (model.mask_layers == 0); pass mask_schedule=None"
      )
    if any(len(e) > 1 for e in schedule) and self.use_kv_cache:
      raise ValueError("masked refinement is HMAR's; it is not available in KV-cache (VAR) mode")
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim != 1:
      raise ValueError(f"labels must be (B,), got shape {labels.shape}")
    known, keep = self._check_edit(known, keep, edit_mode, labels.shape[0])
    self._ready()
    if isinstance(key, (int, np.integer)):
      key = jax.random.key(int(key))
    top_k, top_p, num_scales = jnp.int32(top_k), jnp.float32(top_p), len(self.patch_nums)
    b = labels.shape[0]
    labels2 = jnp.concatenate([labels, jnp.full_like(labels, self.num_classes)])
    nsp = self._compiled("nsp", self._nsp_step_fn, ("si",))
    # The KV cache is donated: each scale's step writes its keys into the same buffer instead of
    # holding the old and the new cache (2 x depth x 2B x L x C) at once.
    nsp_cached = self._compiled("nsp_cached", self._nsp_cached_step_fn, ("si",), ("cache",))
    mask_step = self._compiled("mask", self._mask_step_fn, ("si", "guided"))
    update = self._compiled("update", self._update_fn, ("si",))
    force = self._compiled("force", _force)
    first_mask = self._compiled("first_mask", _least_confident)
    f_hat = np.zeros((b, self.side, self.side, self.cvae), np.float32)  # host zeros: no eager op to compile
    tokens, maps = None, []  # tokens: the last scale's, added to f_hat by the next step
    cache = None
    if self.use_kv_cache:
      cache = self._empty_cache(2 * b, labels)
    for si, pn in enumerate(self.patch_nums):
      k_scale = jax.random.fold_in(key, si)
      t = jnp.float32(guidance_scale(cfg, si, num_scales))
      prev = (f_hat, tokens) if si else (None, None)
      step_key = jax.random.fold_in(k_scale, 0)
      if self.use_kv_cache:
        tokens, conf, new_f_hat, prev_map, cache = nsp_cached(
          self._model_state, self._vq_state, labels2, *prev, cache, step_key, t, top_k, top_p, si=si
        )
      else:
        tokens, conf, new_f_hat, prev_map = nsp(
          self._model_state, self._vq_state, labels2, *prev, step_key, t, top_k, top_p, si=si
        )
      if si:
        f_hat = new_f_hat
        maps.append(prev_map)
      entry, n = schedule[si], pn * pn
      if known is None:
        regenerate = np.ones((b, n), bool)
      else:
        regenerate = ~keep[si].reshape(b, n)
        tokens = force(tokens, regenerate, known[si].reshape(b, n))
      n_regenerate = regenerate.sum(axis=-1)
      if known is not None and edit_mode == "mask":
        # Every token to regenerate starts masked: the masked-prediction branch fills them with the
        # kept ones as context, in len(entry) steps (none at the 1x1 scale, which it never masks).
        steps, mask = range(len(entry) if si else 0), regenerate
      else:
        steps = range(1, len(entry))
        if len(entry) > 1:
          mask = first_mask(conf, regenerate, _share(sum(entry[1:]), n_regenerate, n))
      for j in steps:
        tokens, mask = mask_step(
          self._model_state,
          self._vq_state,
          labels,
          f_hat,
          tokens,
          mask,
          _share(sum(entry[j + 1 :]), n_regenerate, n),
          jax.random.fold_in(k_scale, j if j else len(entry)),
          jnp.float32(mask_cfg),
          top_k,
          top_p,
          si=si,
          guided=bool(mask_cfg),
        )
    f_hat, _, last_map = update(self._vq_state, f_hat, tokens, si=num_scales - 1)
    maps.append(last_map)
    return maps, f_hat

  def _check_edit(self, known, keep, edit_mode: str, batch: int):
    """known / keep as lists of (B, pn, pn) int32 / bool arrays, checked before anything compiles."""
    if edit_mode not in ("force", "mask"):
      raise ValueError(f"edit_mode must be 'force' (VAR-style) or 'mask' (HMAR-style), got {edit_mode!r}")
    if known is None and keep is None:
      return None, None
    if known is None or keep is None:
      raise ValueError("editing needs both known (the token maps to edit) and keep (where they stay)")
    if len(known) != len(self.patch_nums) or len(keep) != len(self.patch_nums):
      raise ValueError(
        f"known and keep need one map per scale ({len(self.patch_nums)}), got {len(known)} and {len(keep)}"
      )
    if edit_mode == "mask" and not self.has_mask_branch:
      raise ValueError(
        "edit_mode 'mask' (HMAR-style) fills the region with the masked-prediction branch, which this model "
        "does not have; use edit_mode 'force'"
      )
    if edit_mode == "mask" and self.use_kv_cache:
      raise ValueError("edit_mode 'mask' is HMAR's; it is not available in KV-cache (VAR) mode")
    known = [np.asarray(k, np.int32) for k in known]  # on the host: reshaped there, not by eager device ops
    keep = [np.asarray(k, bool) for k in keep]
    for si, (pn, k, m) in enumerate(zip(self.patch_nums, known, keep, strict=True)):
      if k.shape != (batch, pn, pn) or m.shape != (batch, pn, pn):
        raise ValueError(f"scale {si}: known and keep must be ({batch}, {pn}, {pn}), got {k.shape} and {m.shape}")
    return known, keep

  def decode(self, f_hat: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [0, 1] from f_hat (B, h, w, Cvae)."""
    self._ready()
    return self._compiled("decode", self._decode_fn)(self._vq_state, f_hat)

  def sample(self, labels, key, **kwargs) -> jax.Array:
    """Images (B, H, W, 3) in [0, 1] for `labels`; keyword arguments as `sample_indices`."""
    _, f_hat = self.sample_indices(labels, key, **kwargs)
    return self.decode(f_hat)
