"""The residual stream's layout pin: the identity wherever it runs, a row-major layout constraint
(forward and gradient) in programs lowered for CUDA, and under a mesh a per-device constraint that
moves no data between devices."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmar_jax.models.blocks import ACT_TOKENS
from hmar_jax.parallel import row_major_on_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

X = np.random.default_rng(0).normal(size=(8, 6, 16)).astype(np.float32)
W = np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32)


def _loss(x):
  return jnp.sum(jnp.tanh(row_major_on_gpu(x, ACT_TOKENS) @ W) ** 2)


def test_values_and_gradients_are_unchanged():
  x = jnp.asarray(X)
  np.testing.assert_array_equal(np.asarray(row_major_on_gpu(x, ACT_TOKENS)), X)
  want = jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(x @ W) ** 2)))(x)
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(_loss))(x)), np.asarray(want))


def test_only_a_cuda_lowering_constrains_the_layout_of_the_value_and_its_gradient():
  traced = jax.jit(jax.grad(_loss)).trace(jnp.asarray(X))
  assert traced.lower(lowering_platforms=("cuda",)).as_text().count("@LayoutConstraint") == 2
  assert "LayoutConstraint" not in traced.lower(lowering_platforms=("cpu",)).as_text()
  assert "LayoutConstraint" not in traced.lower(lowering_platforms=("tpu",)).as_text()


# Under a mesh: 8 virtual CPU devices need XLA_FLAGS before JAX starts, so these checks run in a
# subprocess. The layout constraint is forced on (a CPU compile then shows what a GPU one would do).
MESH_SCRIPT = textwrap.dedent("""
  import json, os, sys
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["TQDM_DISABLE"] = "1"
  import jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  from jax.experimental.layout import Layout, with_layout_constraint
  sys.path.insert(0, "tests")
  import training_helpers as th
  from hmar_jax.models.blocks import ACT_TOKENS
  from hmar_jax.parallel import make_mesh, mesh_rules, partitioning, row_major_on_gpu
  from hmar_jax.training.trainer import Trainer

  OPS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
  x_host = np.random.default_rng(0).normal(size=(8, 6, 16)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32)
  out = {}
  for shape in ((2, 4, 1), (2, 2, 2)):
    mesh = make_mesh(shape, jax.devices()[:8])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_rules("fsdp_tp")):
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
      x = jax.device_put(jnp.asarray(x_host), sharding)
      pin = lambda v: with_layout_constraint(v, Layout(tuple(range(v.ndim))))
      losses = {
        "pinned": lambda x: jnp.sum(jnp.tanh(row_major_on_gpu(x, ACT_TOKENS) @ w) ** 2),
        "bare": lambda x: jnp.sum(jnp.tanh(pin(x) @ w) ** 2),
        "plain": lambda x: jnp.sum(jnp.tanh(x @ w) ** 2),
      }
      partitioning._pin_row_major = pin
      row = {}
      for name, loss in losses.items():
        step = jax.jit(jax.grad(loss), in_shardings=sharding, out_shardings=sharding)
        text = step.lower(x).compile().as_text()
        row[name] = {"collectives": [op for op in OPS if op + "(" in text], "grad": np.asarray(step(x)).tolist()}
      out[str(shape)] = row

  config = th.nsp_config("hmar")
  config.mesh.shape = (2, 2, 2)
  config.model.scan_layers = True
  config.model.remat_policy = "dots"
  trainer = Trainer(config, sys.argv[1], devices=jax.devices()[:8])
  batch = trainer.global_batch(next(iter(trainer.make_loader(0))))
  shardings = trainer.state_shardings()
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       trainer.abstract_state(), shardings)
  with trainer.mesh_context():
    lowered = trainer.compiled_step(batch).trace(state, batch).lower(lowering_platforms=("cuda",))
  out["scanned_step_constraints"] = lowered.as_text().count("@LayoutConstraint")
  print("JSON" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def on_meshes(tmp_path_factory):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, "-c", MESH_SCRIPT, str(tmp_path_factory.mktemp("run"))],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads([line for line in proc.stdout.splitlines() if line.startswith("JSON")][-1][4:])


@pytest.mark.parametrize("mesh", ["(2, 4, 1)", "(2, 2, 2)"])
def test_under_a_mesh_the_constraint_runs_per_device_without_collectives(on_meshes, mesh):
  assert on_meshes[mesh]["pinned"]["collectives"] == []


@pytest.mark.parametrize("mesh", ["(2, 4, 1)", "(2, 2, 2)"])
def test_under_a_mesh_the_pinned_gradient_is_the_plain_one(on_meshes, mesh):
  got, want = (np.asarray(on_meshes[mesh][k]["grad"]) for k in ("pinned", "plain"))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_bare_constraint_under_a_mesh_would_gather_the_batch(on_meshes):
  # Why row_major_on_gpu runs it inside shard_map: sharding propagation gathers a custom call's operand.
  assert "all-gather" in on_meshes["(2, 4, 1)"]["bare"]["collectives"]


def test_a_sharded_scanned_train_step_lowered_for_cuda_pins_the_blocks(on_meshes):
  # The scanned body: each block's entry and exit, forward and gradient.
  assert on_meshes["scanned_step_constraints"] >= 4
