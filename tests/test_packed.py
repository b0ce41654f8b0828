"""Packed sequences (DESIGN.md §3, Variable length): a packed row gives exactly what each document
gives alone, forward and gradients; padding (id 0) gives zeros. So far only the reference
implements `segment_ids`; the other implementations refuse them clearly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsa_jax
from nsa_jax import reference, segments
from conftest import GRAD_TOL, FWD_TOL, assert_close, normal

CFG = dict(compress_block=8, compress_stride=4, select_block=8, num_selected=3, window=6)
HQ, H, D, Dv = 4, 2, 8, 6

settings.register_profile("deterministic", derandomize=True, max_examples=6, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("deterministic")


def _inputs(T: int, seed: int, method: str):
    cfg = nsa_jax.NSAConfig(compress_method=method, **CFG)
    ks = jax.random.split(jax.random.key(seed), 5)
    q = normal(ks[0], (1, T, HQ, D))
    k = normal(ks[1], (1, T, H, D))
    v = normal(ks[2], (1, T, H, Dv))
    g = jax.nn.sigmoid(normal(ks[3], (1, T, HQ, 3)))
    params = nsa_jax.init_compress_params(ks[4], cfg, H, D, Dv)
    return cfg, (q, k, v, g, params)


def _per_document(fn, args, bounds, T):
    """fn run on each document alone, concatenated, zeros for the padding after the last."""
    q, k, v, g, params = args
    parts = [fn(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], params) for a, b in bounds]
    pad = T - bounds[-1][1]
    return jnp.concatenate(parts + [jnp.zeros((1, pad, HQ, Dv), q.dtype)], axis=1)


@given(lengths=st.lists(st.integers(1, 3 * CFG["select_block"]), min_size=1, max_size=4),
       pad=st.integers(0, 5), q_tile=st.sampled_from([1, 4, 8]), causal=st.booleans(),
       method=st.sampled_from(["mean", "mlp"]))
def test_packed_reference_equals_documents_alone(lengths, pad, q_tile, causal, method):
    T = sum(lengths) + pad
    cfg, args = _inputs(T, len(lengths) * 7 + pad, method)
    cfg = nsa_jax.NSAConfig(select_q_tile=q_tile, causal=causal, compress_method=method, **CFG)
    cu = np.cumsum([0] + lengths)
    seg = segments.segment_ids_from_cu_seqlens(jnp.asarray(cu), T)
    bounds = list(zip(cu[:-1], cu[1:]))

    def packed(q, k, v, g, params):
        return reference.nsa_attention(q, k, v, g, config=cfg, segment_ids=seg,
                                       compress_params=params or None)

    def alone(q, k, v, g, params):
        return reference.nsa_attention(q, k, v, g, config=cfg, compress_params=params or None)

    out, vjp = jax.vjp(packed, *args)
    want, want_vjp = jax.vjp(lambda *a: _per_document(alone, a, bounds, T), *args)
    assert_close(out, want, FWD_TOL[jnp.float32], "o")
    ct = normal(jax.random.key(T), out.shape)
    grads, want_grads = vjp(ct), want_vjp(ct)
    for name, gr, wg in zip("q k v g params".split(), grads, want_grads):
        flat = lambda t: jnp.concatenate([jnp.zeros(0)] + [x.ravel() for x in jax.tree.leaves(t)])
        assert_close(flat(gr), flat(wg), GRAD_TOL[jnp.float32], f"d{name}")
    if pad:  # padding tokens get zero output and zero gradient
        assert not np.asarray(out[:, T - pad:]).any()
        for gr in grads[:4]:
            assert not np.asarray(gr[:, T - pad:]).any()


def test_segment_ids_from_cu_seqlens():
    seg = segments.segment_ids_from_cu_seqlens(jnp.array([[0, 3, 4, 6], [0, 7, 7, 7]]), 7)
    np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 3, 3, 0], [1, 1, 1, 1, 1, 1, 1]])


def test_layout_of_runs():
    run, start, pos, length, pad = segments.layout(jnp.array([[5, 5, 2, 2, 2, 5, 0, 0]]))
    np.testing.assert_array_equal(start, [[0, 0, 2, 2, 2, 5, 6, 6]])
    np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 2, 0, 0, 1]])
    np.testing.assert_array_equal(length, [[2, 2, 3, 3, 3, 1, 2, 2]])
    np.testing.assert_array_equal(pad, [[0, 0, 0, 0, 0, 0, 1, 1]])
    assert len(set(np.asarray(run)[0, :6])) == 3  # a repeated id after a gap is a new document


@pytest.mark.parametrize("bad,err,match", [
    (jnp.ones((1, 5), jnp.int32), ValueError, r"segment_ids must have shape \[B, T\]"),
    (jnp.ones((1, 6), jnp.float32), TypeError, "segment_ids.dtype"),
])
def test_reference_rejects_bad_segment_ids(bad, err, match):
    cfg, (q, k, v, g, _) = _inputs(6, 0, "mean")
    with pytest.raises(err, match=match):
        reference.nsa_attention(q, k, v, g, config=cfg, segment_ids=bad)


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_other_implementations_refuse_segment_ids_for_now(impl):
    cfg, (q, k, v, g, _) = _inputs(6, 0, "mean")
    with pytest.raises(NotImplementedError, match="segment_ids"):
        nsa_jax.nsa_attention(q, k, v, g, config=cfg, segment_ids=jnp.ones((1, 6), jnp.int32),
                              implementation=impl, interpret=True)


def test_public_api_and_layer_run_packed_documents_on_the_reference():
    """`nsa_attention(implementation="reference")` and `NSAAttention` (RoPE positions restart at
    each document) give each document's own result."""
    from flax import nnx
    cfg = nsa_jax.NSAConfig(select_q_tile=4, **CFG)
    lengths, T = [11, 5, 9], 27
    cu = np.cumsum([0] + lengths)
    seg = nsa_jax.segment_ids_from_cu_seqlens(jnp.asarray(cu), T)
    _, (q, k, v, g, _) = _inputs(T, 3, "mean")
    direct = reference.nsa_attention(q, k, v, g, config=cfg, segment_ids=seg)
    via_api = nsa_jax.nsa_attention(q, k, v, g, config=cfg, segment_ids=seg,
                                    implementation="reference")
    np.testing.assert_array_equal(np.asarray(via_api), np.asarray(direct))
    layer = nsa_jax.NSAAttention(16, HQ, H, D, cfg, implementation="reference", rngs=nnx.Rngs(0))
    x = normal(jax.random.key(9), (1, T, 16))
    out = layer(x, segment_ids=seg)
    want = jnp.concatenate([layer(x[:, a:b]) for a, b in zip(cu[:-1], cu[1:])]
                           + [jnp.zeros((1, T - cu[-1], 16))], axis=1)
    assert_close(out[:, :cu[-1]], want[:, :cu[-1]], FWD_TOL[jnp.float32], "o")
