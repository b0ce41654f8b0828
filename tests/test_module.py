"""`NSAAttention` in a jitted NNX training step with optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import nsa_jax
from conftest import FWD_TOL, assert_close

CFG = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4,
                        window=16, select_q_tile=16)


def _layer(**kw):
    args = dict(num_heads=4, in_features=32, qkv_features=32, num_kv_heads=2, config=CFG,
                rngs=nnx.Rngs(0))
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


@pytest.mark.parametrize("use_bias", [True, False])
def test_module_matches_functional_api(use_bias):
    """The layer is projections around `nsa_attention`; recompute it by hand from the weights.
    Both sides multiply at full float32 precision: a GPU's default (TF32) would round the
    projections differently on each side."""
    hi = jax.lax.Precision.HIGHEST
    layer = _layer(use_rope=True, v_head_dim=12, use_bias=use_bias,
                   bias_init=nnx.initializers.normal(1.0), precision=hi)
    x = jax.random.normal(jax.random.key(1), (2, 50, 32))
    B, T, _ = x.shape
    proj = lambda lin, x: jnp.einsum("btc,chd->bthd", x, lin.kernel[...], precision=hi) + (
        lin.bias[...] if use_bias else 0)
    q, k, v = proj(layer.query, x), proj(layer.key, x), proj(layer.value, x)
    assert (q.shape, k.shape, v.shape) == ((B, T, 4, 8), (B, T, 2, 8), (B, T, 2, 12))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    q, k = nsa_jax.module.apply_rope(q, pos, 10000.0), nsa_jax.module.apply_rope(k, pos, 10000.0)
    g = jax.nn.sigmoid(jnp.einsum("btc,chg->bthg", x, layer.gate.kernel[...], precision=hi) +
                       layer.gate.bias[...])
    o = nsa_jax.reference.nsa_attention(q, k, v, g, config=CFG)
    want = jnp.einsum("bthd,hdc->btc", o, layer.out.kernel[...], precision=hi) + (
        layer.out.bias[...] if use_bias else 0)
    assert_close(layer(x), want, FWD_TOL[jnp.float32], "y")
    assert (layer.query.bias is not None) == use_bias


def test_argument_order_and_names_follow_multi_head_attention():
    """Positional arguments mean what they mean in `nnx.MultiHeadAttention`, and the layer
    builds the same projection shapes and initial values from the same initialisers."""
    kw = dict(kernel_init=nnx.initializers.normal(0.5), bias_init=nnx.initializers.ones_init())
    nsa = nsa_jax.NSAAttention(4, 24, 32, 20, 2, config=CFG, rngs=nnx.Rngs(3), use_rope=False,
                               **kw)
    mha = nnx.MultiHeadAttention(4, 24, 32, 20, 2, rngs=nnx.Rngs(3), **kw)
    assert (nsa.num_heads, nsa.in_features, nsa.qkv_features, nsa.out_features,
            nsa.num_kv_heads, nsa.head_dim) == (4, 24, 32, 20, 2, 8)
    for name in ("query", "key", "value", "out"):
        a, b = getattr(nsa, name), getattr(mha, name)
        assert a.kernel.shape == b.kernel.shape and a.bias.shape == b.bias.shape, name
    np.testing.assert_array_equal(nsa.key.bias[...], np.ones((2, 8)))


def test_partitioning_metadata_reaches_the_parameters():
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model", None))
    with jax.set_mesh(jax.make_mesh((1,), ("model",))):
        layer = _layer(kernel_init=init, out_kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("model", None, None)))
    assert jax.typeof(layer.query.kernel[...]).sharding.spec == P(None, "model", None)
    assert jax.typeof(layer.out.kernel[...]).sharding.spec == P("model", None, None)


def test_sown_selection_is_the_selection_the_layer_used():
    layer = _layer()
    x = jax.random.normal(jax.random.key(4), (2, 70, 32))
    y, sown = nnx.capture(layer, nnx.Intermediate)(x, sow_selection=True)
    (sel,) = sown["selection"].get_value()
    q, k, v, _ = layer.project(x)
    k_c, _ = nsa_jax.compress(k, v, config=CFG)
    want = nsa_jax.reference.select_blocks(q, k_c, config=CFG)
    np.testing.assert_array_equal(np.asarray(sel.counts), np.asarray(want.counts))
    np.testing.assert_array_equal(np.asarray(sel.indices), np.asarray(want.indices))
    assert_close(y, layer(x), 0.0, "y")


def test_input_positions_shift_rope():
    """RoPE depends on relative positions only, so shifting every position changes nothing."""
    layer = _layer()
    x = jax.random.normal(jax.random.key(5), (1, 40, 32))
    shifted = layer(x, input_positions=jnp.arange(40)[None] + 100)
    assert_close(shifted, layer(x), 1e-4, "y")
    moved = layer(x, input_positions=jnp.arange(40)[None] * 2)
    assert float(jnp.abs(moved - layer(x)).max()) > 1e-3


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


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_nsa_attention_returns_its_selection(impl):
    x = jax.random.normal(jax.random.key(6), (1, 45, 32))
    q, k, v, g = _layer().project(x)
    o, sel = nsa_jax.nsa_attention(q, k, v, g, config=CFG, implementation=impl,
                                   return_selection=True)
    assert_close(o, nsa_jax.nsa_attention(q, k, v, g, config=CFG, implementation=impl), 0.0, "o")
    k_c, _ = nsa_jax.compress(k, v, config=CFG)
    want = nsa_jax.reference.select_blocks(q, k_c, config=CFG)
    np.testing.assert_array_equal(np.asarray(sel.indices), np.asarray(want.indices))
    with pytest.raises(ValueError, match="return_selection is not supported with segment_ids"):
        nsa_jax.nsa_attention(q, k, v, g, config=CFG, implementation=impl, return_selection=True,
                              segment_ids=jnp.ones((1, 45), jnp.int32))
    with pytest.raises(TypeError, match="return_selection must be a bool, got 1"):
        nsa_jax.nsa_attention(q, k, v, g, config=CFG, return_selection=1)
