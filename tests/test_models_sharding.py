"""Sharding a ScaleTransformer over a device mesh changes no model code and no numbers.

Runs in a subprocess with 4 virtual CPU devices (XLA_FLAGS must be set before JAX starts).
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  jax.config.update("jax_default_matmul_precision", "highest")
  from hmar_jax.models import ScaleTransformer, model_config
  from hmar_jax.models.sharding import FSDP_TP_RULES, batch_sharding, make_mesh, shard_params
  m = model_config(2, kind="hmar", patch_nums=(1, 2, 3), width=64, num_heads=4, vocab_size=32, cvae=8,
                   num_classes=10, mask_layers=1)
  m.attn_implementation = "xla"
  graphdef, state = nnx.split(nnx.eval_shape(lambda: ScaleTransformer(m, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), state)
  model = nnx.merge(graphdef, state)
  labels = jnp.array([1, 2, 3, 10])
  x = jnp.asarray(rng.standard_normal((4, 13, 8)), jnp.float32)
  f = nnx.jit(lambda mo, a, b: mo.nsp_logits(a, b))
  want = np.asarray(f(model, labels, x))
  mesh = make_mesh((2, 2), ("data", "model"))
  shard_params(model, mesh, FSDP_TP_RULES)
  assert model.blocks[0].attn.qkv[...].sharding.spec == jax.P("data", None, "model")
  assert model.head.kernel[...].sharding.spec == jax.P("data", "model")
  assert model.class_emb.embedding[...].sharding.spec == jax.P(None, "data")
  bs = batch_sharding(mesh)
  got = f(model, jax.device_put(labels, bs), jax.device_put(x, bs))
  assert len(got.sharding.device_set) == 4
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  print("OK")
""")


def test_fsdp_and_tensor_parallel_sharding_gives_the_same_logits():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
