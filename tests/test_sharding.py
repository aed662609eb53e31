"""wdjax transforms under jax.sharding: a 4-device CPU mesh in a fresh process
(XLA's host device count must be set before JAX starts)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, wdjax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"dense": {"kernel": jax.random.normal(k[0], (64, 32)), "bias": jnp.zeros(32)},
              "head": {"kernel": jax.random.normal(k[1], (32, 8))}}
    grads = jax.tree.map(lambda w: 0.1 * jnp.ones_like(w), params)
    specs = {"dense": {"kernel": P("data", "model"), "bias": P("model")}, "head": {"kernel": P("model", None)}}
    shard = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), t, specs)

    opt = optax.chain(wdjax.adamw(1e-2, 0.1, l1=1e-3), wdjax.max_norm(3.0))

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    sp, sg = shard(params), shard(grads)
    ss = jax.jit(opt.init)(sp)
    ref_p, ref_s = params, opt.init(params)
    for _ in range(5):
        sp, ss = step(sp, ss, sg)
        ref_p, ref_s = step(ref_p, ref_s, grads)
    for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(ref_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert sp["dense"]["kernel"].sharding.spec == P("data", "model"), sp["dense"]["kernel"].sharding
    mu = optax.tree_utils.tree_get(ss, "mu")
    assert mu["dense"]["kernel"].sharding.spec == P("data", "model"), mu["dense"]["kernel"].sharding
    print("sharded ok")
    """
)


def test_transforms_keep_sharding_and_match_unsharded():
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded ok" in proc.stdout
