"""Edge cases and bad input on every implementation: each gives the reference's answer or a clear
error naming the argument; and the registry's choices and refusals (`supports`)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nsa_jax
from nsa_jax import ops, reference
from nsa_jax.ops import base
from conftest import (ALL_IMPLEMENTATIONS, FWD_TOL, GRAD_TOL, IMPLEMENTATIONS, ON_GPU,
                      assert_close, normal)

CFG = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=3,
                        window=10)


def _qkv(B=1, T=40, S=None, HQ=4, H=2, D=16, Dv=8, seed=0):
    S = T if S is None else S
    ks = jax.random.split(jax.random.key(seed), 4)
    return (normal(ks[0], (B, T, HQ, D)), normal(ks[1], (B, S, H, D)), normal(ks[2], (B, S, H, Dv)),
            jax.nn.sigmoid(normal(ks[3], (B, T, HQ, 3))))


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_noncausal_with_fewer_keys_than_queries(impl):
    cfg = nsa_jax.NSAConfig(**{**CFG.__dict__, "causal": False})
    q, k, v, g = _qkv(T=40, S=23)
    for fn in (nsa_jax.nsa_attention, nsa_jax.sliding_window_attention):
        args = (q, k, v, g) if fn is nsa_jax.nsa_attention else (q, k, v)
        want = getattr(reference, fn.__name__)(*args, config=cfg)
        assert_close(fn(*args, config=cfg, **IMPLEMENTATIONS[impl]), want, FWD_TOL[jnp.float32],
                     fn.__name__)


@pytest.mark.parametrize("impl", list(ALL_IMPLEMENTATIONS))
def test_explicit_indices_are_read_by_counts(impl):
    """Entries past `counts`, ids past the blocks and duplicates are ignored the same way by
    every implementation (docs/design.md §4)."""
    cfg = nsa_jax.NSAConfig(**{**CFG.__dict__, "select_q_tile": 16})
    q, k, v, _ = _qkv(T=40)
    # 3 tiles of 16 queries, 3 blocks of 16 keys.
    ids = jnp.array([[[[0, 2, 1], [1, 1, 0], [2, 0, 7]]] * 2], jnp.int32)  # [1, 2, 3, 3]
    counts = jnp.array([[[1, 3, 2]] * 2], jnp.int32)
    sel = nsa_jax.BlockSparseIndices(ids, counts, q_tile=16, block_size=16)
    clean = nsa_jax.BlockSparseIndices(jnp.array([[[[0, -1, -1], [0, 1, -1], [0, 2, -1]]] * 2],
                                                 jnp.int32), jnp.array([[[1, 2, 2]] * 2], jnp.int32),
                                       q_tile=16, block_size=16)
    want = reference.selected_attention(q, k, v, clean, config=cfg)
    got = nsa_jax.selected_attention(q, k, v, sel, config=cfg, **ALL_IMPLEMENTATIONS[impl])
    assert_close(got, want, FWD_TOL[jnp.float32], "o")


@pytest.mark.parametrize("cu,match", [
    ([0, 5, 3], "non-decreasing"), ([0, -2, 4], "non-decreasing"), ([1, 4], "start at 0"),
    ([0, 4, 12], "at or before T=10"),
])
def test_cu_seqlens_rejected(cu, match):
    with pytest.raises(ValueError, match=match):
        nsa_jax.segment_ids_from_cu_seqlens(np.array(cu), 10)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(jax.jit(lambda c: nsa_jax.segment_ids_from_cu_seqlens(c, 10))(
            jnp.array(cu)))


@pytest.mark.parametrize("impl", list(ALL_IMPLEMENTATIONS))
def test_nan_in_padding_stays_out_of_documents(impl):
    q, k, v, g = _qkv(T=30)
    seg = nsa_jax.segment_ids_from_cu_seqlens(jnp.array([0, 11, 25]), 30)
    poison = lambda x: x.at[:, 25:].set(jnp.nan)
    kw = dict(config=CFG, segment_ids=seg, **ALL_IMPLEMENTATIONS[impl])
    clean = nsa_jax.nsa_attention(q, k, v, g, **kw)
    dirty = nsa_jax.nsa_attention(*map(poison, (q, k, v, g)), **kw)
    assert not np.isnan(np.asarray(dirty[:, :25])).any()
    np.testing.assert_array_equal(np.asarray(dirty[:, :25]), np.asarray(clean[:, :25]))
    assert not np.asarray(dirty[:, 25:]).any()


@pytest.mark.parametrize("impl", list(ALL_IMPLEMENTATIONS))
@pytest.mark.parametrize("window", [2 ** 31 - 1, 2 ** 40])
def test_window_past_every_key_means_all_keys(impl, window):
    q, k, v, _ = _qkv(T=33, S=50)
    long = nsa_jax.NSAConfig(**{**CFG.__dict__, "window": window})
    exact = nsa_jax.NSAConfig(**{**CFG.__dict__, "window": 50})
    got = jax.jit(lambda q, k, v: nsa_jax.sliding_window_attention(
        q, k, v, config=long, **ALL_IMPLEMENTATIONS[impl]))(q, k, v)
    want = reference.sliding_window_attention(q, k, v, config=exact)
    assert_close(got, want, FWD_TOL[jnp.float32], "o")


def test_long_window_costs_what_a_window_of_S_costs():
    q = jax.ShapeDtypeStruct((1, 256, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 16), jnp.float32)

    def temp_bytes(window):
        cfg = nsa_jax.NSAConfig(**{**CFG.__dict__, "window": window})
        f = jax.jit(lambda q, k, v: nsa_jax.sliding_window_attention(q, k, v, config=cfg,
                                                                     implementation="xla"))
        return f.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(2 ** 40) == temp_bytes(256)


@pytest.mark.parametrize("impl", list(ALL_IMPLEMENTATIONS))
def test_empty_batch(impl):
    q, k, v, g = _qkv(B=0, T=20)
    f = lambda q, k, v, g: nsa_jax.nsa_attention(q, k, v, g, config=CFG,
                                                 **ALL_IMPLEMENTATIONS[impl])
    o, vjp = jax.vjp(f, q, k, v, g)
    assert o.shape == (0, 20, 4, 8)
    assert [x.shape for x in vjp(o)] == [x.shape for x in (q, k, v, g)]
    k_c, v_c = nsa_jax.compress(k, v, config=CFG)
    o_c, lse = nsa_jax.compressed_attention(q, k_c, v_c, config=CFG, **ALL_IMPLEMENTATIONS[impl])
    assert o_c.shape == (0, 20, 4, 8) and lse.shape == (0, 20, 4)
    sel = nsa_jax.select_blocks(q, k_c, config=CFG, **ALL_IMPLEMENTATIONS[impl])
    assert sel.indices.shape == (0, 2, 20, 3)


@pytest.mark.parametrize("impl", list(ALL_IMPLEMENTATIONS))
@pytest.mark.parametrize("D,Dv", [(0, 8), (16, 0)])
def test_empty_head_dims_rejected(impl, D, Dv):
    q, k, v, _ = _qkv(D=D, Dv=Dv)
    with pytest.raises(ValueError, match=f"head dims must be positive, got D={D} .* Dv={Dv}"):
        nsa_jax.nsa_attention(q, k, v, config=CFG, **ALL_IMPLEMENTATIONS[impl])


def test_second_order_gradients_through_triton_say_so():
    q, k, v, _ = _qkv(T=24)
    f = lambda q: nsa_jax.sliding_window_attention(q, k, v, config=CFG,
                                                   **IMPLEMENTATIONS["triton"]).sum()
    with pytest.raises(NotImplementedError, match="no second-order gradients"):
        jax.grad(lambda q: jax.grad(f)(q).sum())(q)


@pytest.mark.parametrize("impl", list(ALL_IMPLEMENTATIONS))
def test_second_order_gradients_where_supported(impl):
    if impl in ("triton", "mosaic"):
        pytest.skip("refused with a clear error (test_second_order_gradients_through_triton_say_so)")
    q, k, v, _ = _qkv(T=24)
    f = lambda q, impl: nsa_jax.sliding_window_attention(q, k, v, config=CFG,
                                                         **ALL_IMPLEMENTATIONS[impl]).sum() ** 2
    hvp = lambda impl: jax.grad(lambda q: jax.grad(f)(q, impl).sum())(q)
    assert_close(hvp(impl), hvp("reference"), GRAD_TOL[jnp.float32], "d2q")


q0, k0, v0, g0 = _qkv()


@pytest.mark.parametrize("call,err,match", [
    (lambda: nsa_jax.nsa_attention(q0, k0, v0, config=CFG, interpret=1), TypeError,
     "interpret must be a bool, got 1"),
    (lambda: reference.nsa_attention(q0, k0, v0, config=CFG, max_segments=0,
                                     segment_ids=jnp.ones((1, 40), jnp.int32)), ValueError,
     "max_segments=0 must be a positive int"),
    (lambda: nsa_jax.select_blocks(q0, nsa_jax.compress(k0, v0, config=CFG)[0], config=CFG,
                                   lse=jnp.zeros((1, 40, 4), jnp.int32)), TypeError,
     "lse.dtype=int32 must be float32"),
    (lambda: nsa_jax.nsa_attention(q0, k0, v0, config=CFG, tilings=nsa_jax.Tiling()), TypeError,
     "tilings must be an nsa_jax.MosaicTilings or nsa_jax.TritonTilings or "
     "nsa_jax.XlaTilings or None"),
    (lambda: nsa_jax.nsa_attention(q0[:, :, :0], k0, v0, config=CFG), ValueError,
     "query heads HQ=0 must be a multiple of KV heads H=2"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("kwargs,call,match", [
    ({}, lambda m: m(jnp.zeros((1, 10, 12))),
     re.escape("inputs_q must have shape [B, T, in_features=16]")),
    ({}, lambda m: m(jnp.zeros((1, 10, 16)), input_positions=jnp.arange(9)[None]),
     re.escape("input_positions must have shape [B, T] = (1, 10)")),
    (dict(qkv_features=18), None, "qkv_features=18 must be a multiple of num_heads=4"),
    (dict(v_head_dim=0), None, "v_head_dim=0 must be a positive int"),
])
def test_layer_bad_input(kwargs, call, match):
    with pytest.raises(ValueError, match=match):
        layer = nsa_jax.NSAAttention(4, 16, **{"qkv_features": 32, **kwargs}, num_kv_heads=2,
                                     config=CFG, rngs=nnx.Rngs(0))
        call(layer)


SHAPES = base.Shapes(B=1, T=64, S=64, HQ=4, H=2, D=16, Dv=16)


def test_explicit_backend_refusals_name_the_reason():
    cfg24 = nsa_jax.NSAConfig(compress_block=8, compress_stride=8, select_block=24, num_selected=4)
    with pytest.raises(NotImplementedError, match="'triton' needs select_block divisible by 16"):
        ops.resolve("triton", ("selected",), cfg24, base.Shapes(**{**SHAPES.__dict__,
                                                                    "select_block": 24}), True)
    noncausal = nsa_jax.NSAConfig(causal=False)
    with pytest.raises(NotImplementedError, match="non-causal 'scoring' with a per-row kv_len"):
        ops.resolve("triton", ("scoring",), noncausal,
                    base.Shapes(**{**SHAPES.__dict__, "per_row_kv_len": True}), True)
    if not ON_GPU:
        with pytest.raises(RuntimeError, match="implementation='mosaic' needs a Hopper GPU"):
            ops.resolve("mosaic", ("window",), CFG, SHAPES, False)
        with pytest.raises(RuntimeError, match="implementation='triton' needs an NVIDIA GPU"):
            ops.resolve("triton", ("window",), CFG, SHAPES, False)


def test_none_picks_per_operation_the_fastest_that_serves(monkeypatch):
    """With the Pallas backend available, None keeps it for every operation it supports and
    takes "xla" for the rest (the README's promise, for nsa_attention as for the pieces)."""
    triton, mosaic = ops.get("triton"), ops.get("mosaic")
    monkeypatch.setattr(type(triton), "available", lambda self, interpret: base.YES)
    # On a Hopper GPU "mosaic" would come first; this test is about the Triton/XLA split.
    monkeypatch.setattr(type(mosaic), "available",
                        lambda self, interpret: base.Support("not Hopper"))
    cfg24 = nsa_jax.NSAConfig(compress_block=8, compress_stride=8, select_block=24, num_selected=4)
    shapes = base.Shapes(**{**SHAPES.__dict__, "select_block": 24})
    plan = ops.resolve(None, base.OPERATIONS, cfg24, shapes, False)
    assert {op: b.name for op, b in plan.items()} == {
        "compressed": "triton", "scoring": "triton", "selected": "xla", "window": "triton"}
    monkeypatch.setattr(type(triton), "available",
                        lambda self, interpret: base.Support("no GPU here"))
    plan = ops.resolve(None, base.OPERATIONS, CFG, SHAPES, False)
    assert {b.name for b in plan.values()} == {"xla"}


@pytest.mark.gpu
def test_default_implementation_falls_back_inside_nsa_attention():
    cfg = nsa_jax.NSAConfig(compress_block=8, compress_stride=8, select_block=24, num_selected=4,
                            window=16)
    q, k, v, g = _qkv(T=100)
    assert_close(nsa_jax.nsa_attention(q, k, v, g, config=cfg),
                 reference.nsa_attention(q, k, v, g, config=cfg), FWD_TOL[jnp.float32], "o")
