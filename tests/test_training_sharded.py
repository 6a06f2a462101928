"""The shared trainer on a device mesh: every task gives the same losses on any (data, fsdp, tensor)
mesh as on one device, and its parameters are split as the logical-axis rules say.

Runs in subprocesses with 8 virtual CPU devices (XLA_FLAGS must be set before JAX starts). Each
task trains 3 steps on one device and on several of the meshes 8x1x1, 2x4x1, 2x2x2 and 1x4x2; float32 with
'highest' matmul precision, so the losses agree to float32 rounding of the different reduction
orders. 'var_scan' is VAR with scanned, rematerialised blocks and 2 accumulated micro-batches.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ["(1, 1, 1)", "(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)", "(1, 4, 2)"]

SCRIPT = textwrap.dedent("""
  import json, os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["TQDM_DISABLE"] = "1"
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  from flax import nnx
  sys.path.insert(0, "tests")
  import training_helpers as th
  from hmar_jax import checkpoint
  from hmar_jax.models import ScaleTransformer, tiny_model_config
  from hmar_jax.training.trainer import Trainer, make_task

  name, workdir = sys.argv[1], sys.argv[2]

  def make():
    if name == "nsp":
      return th.nsp_config("hmar")
    if name == "var_scan":
      c = th.nsp_config("var", batch=16)
      c.model.scan_layers = True
      c.model.remat_policy = "full"
      c.train.grad_accum_steps = 2
      return c
    if name == "tokenizer":
      return th.tokenizer_config()
    if name == "mar":
      return th.mar_config()
    m = tiny_model_config("hmar")
    m.mask_layers = 0
    init = os.path.join(workdir, "init")
    if not os.path.exists(init):
      model = nnx.jit(lambda: ScaleTransformer(m, rngs=nnx.Rngs(1)))()
      checkpoint.save_params(init, model, metadata={"model": m.to_dict()})
    return th.mask_config(init)

  task = make_task(make(), os.path.join(workdir, "run"))
  out = {}
  # Next-scale training runs on every mesh, the tokenizer (unnamed weights, split by size) on four;
  # masked finetuning and 'var_scan' (block layout, remat, accumulation) on the mesh with all three
  # axes split, whose rules are the next-scale ones.
  shapes = {"nsp": [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)],
            "tokenizer": [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]}.get(name, [(1, 1, 1), (2, 2, 2)])
  first = None
  for shape in shapes:
    c = make()
    c.mesh.shape = shape
    devices = jax.devices()[:1] if shape == (1, 1, 1) else None
    trainer = Trainer(c, os.path.join(workdir, "run"), task=task, devices=devices)
    with trainer.mesh_context():
      if first is None:
        state = trainer.init_state()
        first = jax.device_get(state)
      else:   # the same initial state, placed in this mesh's shards
        state = jax.device_put(first, trainer.state_shardings())
      loader = iter(trainer.make_loader(0))
      losses = []
      for _ in range(3):
        batch = trainer.global_batch(next(loader))
        state, metrics = trainer.compiled_step(batch)(state, batch)
        losses.append(float(metrics["loss"]))
      if name == "nsp" and shape == (8, 1, 1):
        # Save after 3 steps, then take a 4th: the 1x4x2 mesh below restores and retakes it.
        ckpt = trainer.checkpoints()
        ckpt.save(3, state.as_dict(), None, trainer._meta(0))
        ckpt.close()
        batch = trainer.global_batch(next(loader))
        state, metrics = trainer.compiled_step(batch)(state, batch)
        out["step4_on_8x1x1"] = float(metrics["loss"])
      if name == "nsp" and shape == (1, 4, 2):
        restored, restored_loader, _ = trainer.restore_or_init(trainer.checkpoints())
        batch = trainer.global_batch(next(restored_loader))
        restored, metrics = trainer.compiled_step(batch)(restored, batch)
        out["step4_restored_onto_1x4x2"] = {
            "step": int(restored.step), "loss": float(metrics["loss"]),
            "qkv": [None if a is None else (a if isinstance(a, str) else list(a))
                    for a in restored.params["blocks"][0]["attn"]["qkv"].sharding.spec]}
    specs = {jax.tree_util.keystr(k): [None if a is None else (a if isinstance(a, str) else list(a))
                                       for a in v.sharding.spec]
             for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    opt = {jax.tree_util.keystr(k): [None if a is None else (a if isinstance(a, str) else list(a))
                                     for a in v.sharding.spec]
           for k, v in jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if v.ndim > 0}
    out[str(shape)] = {"losses": losses, "specs": specs, "opt": opt}
  print("JSON" + json.dumps(out))
""")


TASKS = ("nsp", "mask", "tokenizer", "var_scan", "mar")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """Runs the tasks' subprocesses side by side (each compiles mostly on one core)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = {
    name: subprocess.Popen(
      [sys.executable, "-c", SCRIPT, name, str(tmp_path_factory.mktemp(name))],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name in TASKS
  }
  out = {}
  for name, proc in procs.items():
    try:
      stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
      for p in procs.values():
        p.kill()
      raise
    assert proc.returncode == 0, stderr[-4000:]
    out[name] = json.loads([l for l in stdout.splitlines() if l.startswith("JSON")][-1][4:])
  return out.__getitem__


# Relative tolerance per task. The tokenizer's is wider: Adam's first steps divide each gradient by
# its own magnitude, so rounding noise in near-zero gradients (GroupNorm-cancelled weights) moves
# those weights by up to the learning rate; its losses still agree to 5e-6.
TOLERANCE = {"nsp": 2e-6, "mask": 2e-6, "var_scan": 2e-6, "tokenizer": 2e-5, "mar": 2e-5}


@pytest.mark.parametrize("task", TASKS)
def test_every_mesh_gives_the_one_device_losses(results, task):
  out = results(task)
  want = out[MESHES[0]]["losses"]
  assert all(abs(x) > 0 for x in want)
  for mesh in [m for m in MESHES[1:] if m in out]:
    got = out[mesh]["losses"]
    assert got == pytest.approx(want, rel=TOLERANCE[task]), f"mesh {mesh}: {got} vs one device {want}"


def test_mar_parameters_are_split_by_the_rules(results):
  specs = results("mar")["(2, 2, 2)"]["specs"]
  block = "['backbone']['encoder_blocks'][0]"
  assert specs[f"{block}['attn']['qkv']['kernel']"] == ["fsdp", "tensor"]
  assert specs[f"{block}['attn']['proj']['kernel']"] == ["tensor", "fsdp"]
  assert specs[f"{block}['mlp']['fc1']['kernel']"] == ["fsdp", "tensor"]


def test_transformer_parameters_are_split_by_the_rules(results):
  specs = results("nsp")["(2, 2, 2)"]["specs"]
  # FSDP over the model width, Megatron columns / rows over tensor.
  assert specs["['blocks'][0]['attn']['qkv']"] == ["fsdp", None, "tensor"]
  assert specs["['blocks'][0]['attn']['proj']['kernel']"] == ["tensor", "fsdp"]
  assert specs["['blocks'][0]['ffn']['fc1']['kernel']"] == ["fsdp", "tensor"]
  assert specs["['blocks'][0]['ffn']['fc2']['kernel']"] == ["tensor", "fsdp"]
  assert specs["['head']['kernel']"] == ["fsdp", "tensor"]
  # 11 class rows do not split; their width does.
  assert specs["['class_emb']['embedding']"] == [None, "fsdp"]
  # Pure data parallelism replicates everything.
  assert all(s == [] for s in results("nsp")["(8, 1, 1)"]["specs"].values())


def test_optimiser_state_is_split_like_its_parameters(results):
  out = results("nsp")["(1, 4, 2)"]
  specs, opt = out["specs"], out["opt"]
  for name, spec in specs.items():
    mu = [v for k, v in opt.items() if k.endswith(name) and ".mu" in k]
    assert mu == [spec], name


def test_scanned_blocks_keep_their_layer_axis_whole(results):
  specs = results("var_scan")["(2, 2, 2)"]["specs"]
  assert specs["['blocks']['attn']['qkv']"] == [None, "fsdp", None, "tensor"]


def test_mask_finetuning_splits_only_the_branch_it_trains(results):
  specs = results("mask")["(2, 2, 2)"]["specs"]
  assert specs and all(
    k.split("]")[0].strip("['") in ("mask_blocks", "mask_head", "mask_head_nm", "mask_embed") for k in specs
  )


def test_unnamed_tokenizer_weights_are_split_over_fsdp(results):
  specs = results("tokenizer")["(2, 2, 2)"]["specs"]
  big = [s for s in specs.values() if s]
  assert big and all("fsdp" in s for s in big)


def test_a_checkpoint_restores_onto_another_mesh(results):
  out = results("nsp")
  restored = out["step4_restored_onto_1x4x2"]
  assert restored["step"] == 4 and restored["qkv"] == ["fsdp", None, "tensor"]
  # Saved on 8x1x1 after 3 steps, restored onto 1x4x2: its 4th step is the 4th step on 8x1x1.
  assert restored["loss"] == pytest.approx(out["step4_on_8x1x1"], rel=2e-6)
