"""`NSAAttention` in a jitted NNX training step with optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nsa_jax
from conftest import FWD_TOL, assert_close

CFG = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4,
                        window=16, select_q_tile=16)


def _layer(**kw):
    args = dict(in_features=32, num_heads=4, num_kv_heads=2, head_dim=8, config=CFG, rngs=nnx.Rngs(0))
    args.update(kw)
    return nsa_jax.NSAAttention(**args)


@pytest.mark.parametrize("method", ["mean", "linear", "mlp"])
def test_training_step_loss_falls(method):
    """Copy a token from far back (beyond the window) to the end: the loss must drop."""
    cfg = nsa_jax.NSAConfig(**{**CFG.__dict__, "compress_method": method})
    layer = _layer(config=cfg, v_head_dim=12, out_features=32)
    opt = nnx.Optimizer(layer, optax.adam(3e-3), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (4, 96, 32))
    target = jnp.broadcast_to(x[:, 5:6], x.shape)

    @nnx.jit
    def step(layer, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: ((m(x) - target) ** 2).mean())(layer)
        opt.update(layer, grads)
        return loss

    losses = [float(step(layer, opt, x)) for _ in range(30)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_module_matches_functional_api():
    """The layer is projections around `nsa_attention`; recompute it by hand."""
    layer = _layer(use_rope=True, v_head_dim=12)
    x = jax.random.normal(jax.random.key(1), (2, 50, 32))
    B, T, _ = x.shape
    q = layer.q_proj(x).reshape(B, T, 4, 8)
    k = layer.k_proj(x).reshape(B, T, 2, 8)
    v = layer.v_proj(x).reshape(B, T, 2, 12)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    q, k = nsa_jax.module.apply_rope(q, pos, 10000.0), nsa_jax.module.apply_rope(k, pos, 10000.0)
    g = jax.nn.sigmoid(layer.gate_proj(x)).reshape(B, T, 4, 3)
    o = nsa_jax.reference.nsa_attention(q, k, v, g, config=CFG)
    want = layer.o_proj(o.reshape(B, T, 48))
    assert_close(layer(x), want, FWD_TOL[jnp.float32], "y")


def test_rope_preserves_norm_and_relative_position():
    x = jax.random.normal(jax.random.key(2), (1, 6, 2, 8))
    pos = jnp.arange(6)[None]
    r = nsa_jax.module.apply_rope(x, pos, 10000.0)
    np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # <rope(a, i), rope(b, j)> depends on i - j only.
    a, b = x[:, :1], x[:, 1:2]
    dot = lambda i, j: (nsa_jax.module.apply_rope(a, jnp.array([[i]]), 1e4) *
                        nsa_jax.module.apply_rope(b, jnp.array([[j]]), 1e4)).sum()
    np.testing.assert_allclose(dot(3, 1), dot(7, 5), rtol=1e-4)


def test_bfloat16_layer():
    layer = _layer(dtype=jnp.bfloat16)
    y = nnx.jit(lambda m, x: m(x))(layer, jnp.ones((1, 40, 32)))
    assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())
