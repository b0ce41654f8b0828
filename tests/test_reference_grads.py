"""The reference's gradients are trusted because they match finite differences in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

import nsa_jax
from nsa_jax import reference


@pytest.mark.parametrize("method", ["mean", "mlp"])
def test_reference_gradients_match_finite_differences(method):
    cfg = nsa_jax.NSAConfig(compress_block=8, compress_stride=4, select_block=8, num_selected=3,
                            window=6, select_q_tile=1, compress_method=method)
    with jax.enable_x64(True):
        ks = jax.random.split(jax.random.key(0), 5)
        B, T, HQ, H, D, Dv = 1, 21, 2, 1, 4, 3
        q = jax.random.normal(ks[0], (B, T, HQ, D), jnp.float64)
        k = jax.random.normal(ks[1], (B, T, H, D), jnp.float64)
        v = jax.random.normal(ks[2], (B, T, H, Dv), jnp.float64)
        g = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, HQ, 3), jnp.float64))
        params = jax.tree.map(lambda p: p.astype(jnp.float64),
                              nsa_jax.init_compress_params(ks[4], cfg, H, D, Dv))
        fn = lambda q, k, v, g, params: reference.nsa_attention(q, k, v, g, config=cfg,
                                                                compress_params=params or None)
        assert fn(q, k, v, g, params).dtype == jnp.float64
        check_grads(fn, (q, k, v, g, params), order=1, modes=("rev",), eps=1e-6, atol=1e-6,
                    rtol=1e-6)
