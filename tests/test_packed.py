"""Packed sequences (docs/design.md §3, Variable length): a packed row gives exactly what each document
gives alone, forward and gradients, for every implementation; padding (id 0) gives zeros."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsa_jax
from nsa_jax import reference, segments
from conftest import (GRAD_TOL, FWD_TOL, IMPLEMENTATIONS, ON_GPU, assert_bit_identical, assert_close,
                      normal, upcast)

# Blocks of 16 keys: the smallest the Triton kernels take.
CFG = dict(compress_block=16, compress_stride=8, select_block=16, num_selected=3, window=10)
HQ, H, D, Dv = 4, 2, 16, 8
IMPLS = {"reference": dict(implementation="reference"), **IMPLEMENTATIONS}

settings.register_profile("deterministic", derandomize=True, max_examples=6, deadline=None,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
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


def _flat(tree):
    return jnp.concatenate([jnp.zeros(0)] + [x.ravel() for x in jax.tree.leaves(tree)])


# Examples per (implementation, causal); kernels compile per shape on a GPU and run in interpret
# mode on CPU, so they get fewer; the reference, dense over the aligned layout, fewer still (the
# others are compared with it on every example).
EXAMPLES = {"reference": 2, "xla": 3, "triton": 3 if ON_GPU else 2, "mosaic": 3}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_packed_equals_documents_alone(impl, causal):
    """Random document lengths (1 .. 3 selection blocks, 1-token documents included), padding,
    query tiles, causal or not, mean or MLP compression: the packed row's output and gradients
    equal the documents run alone and concatenated, and the packed reference."""
    kw = IMPLS[impl]

    @settings(max_examples=EXAMPLES[impl])
    @given(lengths=st.lists(st.integers(1, 3 * CFG["select_block"]), min_size=1, max_size=4),
           pad=st.integers(0, 5), q_tile=st.sampled_from([1, 4, 16]),
           method=st.sampled_from(["mean", "mlp"]))
    def check(lengths, pad, q_tile, method):
        T = sum(lengths) + pad
        _, args = _inputs(T, len(lengths) * 7 + pad, method)
        cfg = nsa_jax.NSAConfig(select_q_tile=q_tile, causal=causal, compress_method=method, **CFG)
        cu = np.cumsum([0] + lengths)
        seg = segments.segment_ids_from_cu_seqlens(jnp.asarray(cu), T)
        bounds = list(zip(cu[:-1], cu[1:]))

        # Jitted: every example brings new shapes, and compiling one program per shape costs a
        # fraction of compiling each operation of an eager call.
        @jax.jit
        def run(q, k, v, g, params, seg=None):
            return nsa_jax.nsa_attention(q, k, v, g, config=cfg, segment_ids=seg,
                                         compress_params=params or None, **kw)

        out, vjp = jax.vjp(lambda *a: run(*a, seg=seg), *args)
        want, want_vjp = jax.vjp(lambda *a: _per_document(run, a, bounds, T), *args)
        assert_close(out, want, FWD_TOL[jnp.float32], "o")
        ct = normal(jax.random.key(T), out.shape)
        grads, want_grads = vjp(ct), want_vjp(ct)
        for name, gr, wg in zip("q k v g params".split(), grads, want_grads):
            assert_close(_flat(gr), _flat(wg), GRAD_TOL[jnp.float32], f"d{name}")
        if impl != "reference":
            ref = jax.jit(lambda q, k, v, g, params: reference.nsa_attention(
                q, k, v, g, config=cfg, segment_ids=seg, compress_params=params or None))(*args)
            assert_close(out, ref, FWD_TOL[jnp.float32], "o vs packed reference")
        if pad:  # padding tokens get zero output and zero gradient
            assert not np.asarray(out[:, T - pad:]).any()
            for gr in grads[:4]:
                assert not np.asarray(gr[:, T - pad:]).any()

    check()


@pytest.mark.parametrize("impl", ["xla", "triton"])
def test_packed_gradients_are_bit_identical_across_runs(impl):
    lengths, T = [37, 1, 20, 30], 90
    cfg = nsa_jax.NSAConfig(select_q_tile=16, **CFG)
    _, (q, k, v, g, _) = _inputs(T, 5, "mean")
    seg = segments.segment_ids_from_cu_seqlens(jnp.asarray(np.cumsum([0] + lengths)), T)
    f = jax.jit(jax.grad(lambda q, k, v, g: (nsa_jax.nsa_attention(
        q, k, v, g, config=cfg, segment_ids=seg, **IMPLS[impl]) ** 2).sum(), argnums=(0, 1, 2, 3)))
    assert_bit_identical(f(q, k, v, g), f(q, k, v, g))


def test_pack_places_documents_on_aligned_rows():
    cfg = nsa_jax.NSAConfig(select_q_tile=4, **CFG)  # unit lcm(8, 16, 4) = 16
    assert segments.unit(cfg) == 16
    seg = jnp.array([[1, 1, 1, 2, 0, 3, 3]], jnp.int32)
    pk = segments.pack(seg, cfg, max_segments=3)
    assert pk.lo.shape == (1, segments.capacity(7, cfg, 3)) == (1, 64)
    np.testing.assert_array_equal(pk.dest, [[0, 1, 2, 16, 64, 32, 33]])
    np.testing.assert_array_equal(pk.lo[0, [0, 2, 3, 16, 17, 33]], [0, 0, 3, 16, 17, 32])
    np.testing.assert_array_equal(pk.hi[0, [0, 2, 3, 16, 17, 33]], [3, 3, 3, 17, 17, 34])
    x = normal(jax.random.key(0), (1, 7, 2))
    back = pk.restore(pk.align(x))
    np.testing.assert_array_equal(back, jnp.where((seg > 0)[..., None], x, 0))


def test_too_many_documents_for_the_layout_raises_at_run_time():
    cfg = nsa_jax.NSAConfig(**CFG)
    T = 20
    _, (q, k, v, g, _) = _inputs(T, 1, "mean")
    seg = jnp.arange(1, T + 1, dtype=jnp.int32)[None]  # 20 one-token documents, 16 rows each

    def run(fn, **kw):
        return jax.jit(lambda q, k, v, g: fn(q, k, v, g, config=cfg, segment_ids=seg, **kw))(
            q, k, v, g)

    with pytest.raises(Exception, match="max_segments"):
        jax.block_until_ready(run(nsa_jax.nsa_attention, implementation="xla"))
    ok = run(nsa_jax.nsa_attention, implementation="xla", max_segments=T)
    want = run(reference.nsa_attention, max_segments=T)
    assert_close(ok, want, FWD_TOL[jnp.float32], "o")


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


@pytest.mark.parametrize("impl", list(IMPLS))
def test_layer_runs_packed_documents(impl):
    """`NSAAttention` (RoPE positions restart at each document) gives each document's own result;
    on the reference, `nsa_attention` through the API equals the reference module's."""
    from flax import nnx
    cfg = nsa_jax.NSAConfig(select_q_tile=4, **CFG)
    lengths, T = [11, 5, 9], 27
    cu = np.cumsum([0] + lengths)
    seg = nsa_jax.segment_ids_from_cu_seqlens(jnp.asarray(cu), T)
    _, (q, k, v, g, _) = _inputs(T, 3, "mean")
    direct = jax.jit(lambda *a: reference.nsa_attention(*a, config=cfg, segment_ids=seg))
    via_api = jax.jit(lambda *a: nsa_jax.nsa_attention(*a, config=cfg, segment_ids=seg,
                                                       implementation="reference"))
    np.testing.assert_array_equal(np.asarray(via_api(q, k, v, g)), np.asarray(direct(q, k, v, g)))
    layer = nsa_jax.NSAAttention(HQ, 16, HQ * D, num_kv_heads=H, config=cfg, rngs=nnx.Rngs(0),
                                 **IMPLS[impl])
    # Jitted: eagerly, each document's new length compiles every operation of the layer again.
    call = nnx.jit(lambda layer, x, seg=None: layer(x, segment_ids=seg))
    x = normal(jax.random.key(9), (1, T, 16))
    out = call(layer, x, seg)
    want = jnp.concatenate([call(layer, x[:, a:b]) for a, b in zip(cu[:-1], cu[1:])]
                           + [jnp.zeros((1, T - cu[-1], 16))], axis=1)
    assert_close(out[:, :cu[-1]], want[:, :cu[-1]], FWD_TOL[jnp.float32], "o")


@pytest.mark.gpu
def test_packed_dense_baseline_stays_inside_documents():
    """The benchmark's cuDNN packed baseline is causal attention inside each document."""
    from nsa_jax.tools import bench
    lengths, T = [100, 37, 250, 125], 512
    ks = jax.random.split(jax.random.key(0), 3)
    q = normal(ks[0], (1, T, 8, 64), jnp.bfloat16)
    k, v = (normal(key, (1, T, 2, 64), jnp.bfloat16) for key in ks[1:])
    cu = np.cumsum([0] + lengths)
    doc = np.searchsorted(cu, np.arange(T), side="right")
    mask = (doc[:, None] == doc[None, :]) & np.tri(T, dtype=bool)
    want = jax.nn.dot_product_attention(*upcast((q, k, v)), mask=jnp.asarray(mask)[None, None],
                                        implementation="xla")
    assert_close(bench.packed_dense(q, k, v, lengths), want, FWD_TOL[jnp.bfloat16], "o")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_branch_functions_take_segment_ids(impl):
    """Each piece with segment_ids: the window and compressed branches equal per-document runs;
    compress -> compressed_attention -> select_blocks -> selected_attention -> window, gated,
    equals nsa_attention on the same packed row."""
    kw = IMPLS[impl]
    lengths, T = [37, 1, 20, 30], 90
    cu = np.cumsum([0] + lengths)
    seg = segments.segment_ids_from_cu_seqlens(jnp.asarray(cu), T)
    cfg = nsa_jax.NSAConfig(select_q_tile=4, **CFG)
    _, (q, k, v, g, _) = _inputs(T, 11, "mean")
    p = dict(config=cfg, segment_ids=seg, **kw)
    k_c, v_c = nsa_jax.compress(k, v, config=cfg, segment_ids=seg)
    o_c, lse = nsa_jax.compressed_attention(q, k_c, v_c, **p)
    sel = nsa_jax.select_blocks(q, k_c, lse=lse, **p)
    o_s = nsa_jax.selected_attention(q, k, v, sel, **p)
    o_w = nsa_jax.sliding_window_attention(q, k, v, **p)
    composed = nsa_jax.gate_and_combine(o_c, o_s, o_w, g)
    assert_close(composed, nsa_jax.nsa_attention(q, k, v, g, **p), FWD_TOL[jnp.float32], "o")
    one = dict(config=cfg, **kw)

    @jax.jit  # one program per document length instead of one per operation
    def alone(q, k, v):
        kc_doc, vc_doc = nsa_jax.compress(k, v, config=cfg)
        return (nsa_jax.sliding_window_attention(q, k, v, **one),
                *nsa_jax.compressed_attention(q, kc_doc, vc_doc, **one))

    for a, b in zip(cu[:-1], cu[1:]):
        w_doc, oc_doc, lse_doc = alone(q[:, a:b], k[:, a:b], v[:, a:b])
        assert_close(o_w[:, a:b], w_doc, FWD_TOL[jnp.float32], f"window doc {a}:{b}")
        assert_close(o_c[:, a:b], oc_doc, FWD_TOL[jnp.float32], f"compressed doc {a}:{b}")
        np.testing.assert_array_equal(np.isfinite(lse[:, a:b]), np.isfinite(lse_doc))


def test_packed_inputs_are_validated():
    cfg = nsa_jax.NSAConfig(**CFG)
    T = 20
    _, (q, k, v, g, _) = _inputs(T, 2, "mean")
    seg = jnp.ones((1, T), jnp.int32)
    with pytest.raises(ValueError, match="max_segments=0"):
        nsa_jax.nsa_attention(q, k, v, g, config=cfg, segment_ids=seg, implementation="xla",
                              max_segments=0)
    with pytest.raises(ValueError, match="S == T"):
        nsa_jax.sliding_window_attention(q[:, :10], k, v, config=cfg, segment_ids=seg[:, :10],
                                         implementation="xla")
    with pytest.raises(TypeError, match="BlockSparseIndices"):
        nsa_jax.selected_attention(q, k, v, jnp.zeros((1, T, H, 3), jnp.int32), config=cfg,
                                   segment_ids=seg, implementation="xla")
    k_c, _ = nsa_jax.compress(k, v, config=cfg)  # unpacked: too few compressed tokens
    with pytest.raises(ValueError, match="compressed tokens"):
        nsa_jax.compressed_attention(q, k_c, k_c, config=cfg, segment_ids=seg, implementation="xla")
