"""Hand-computed cases on every implementation: compressed visibility and block selection, end to
end through the public functions (docs/design.md §3).

Every expected array below was worked out by hand from the rules in docs/design.md, never by
running the code under test. Geometry used throughout unless a test says otherwise: l = 32,
d = 16, so compressed token i covers keys [16 i, 16 i + 32) and its last key is 16 i + 31;
l' = 64, so selection block j covers keys [64 j, 64 j + 64).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from conftest import ALL_IMPLEMENTATIONS as KW
from conftest import i32, make_cfg, piecewise

IMPLS = list(KW)
NEG_INF = -np.inf
LOG2, LOG3, LOG4 = math.log(2.0), math.log(3.0), math.log(4.0)


def _compressed_inputs(B, T, N_c):
    # Zero keys make every visible logit 0, so lse = log(#visible) and o = mean of visible ids.
    q = jnp.ones((B, T, 2, 4), jnp.float32)
    k_c = jnp.zeros((B, N_c, 1, 4), jnp.float32)
    v_c = jnp.broadcast_to(jnp.arange(N_c, dtype=jnp.float32)[None, :, None, None], (B, N_c, 1, 1))
    return q, k_c, v_c


# Each case: (T, N_c, kv_len, causal, lse per [B, T], o per [B, T]).
COMPRESSED_CASES = {
    # Counts visible per t: 0 for t < 31, 1 up to 46, 2 up to 62, 3 up to 78, 4 at t = 79.
    "train": (80, 4, None, True,
              piecewise([(31, NEG_INF), (16, 0.0), (16, LOG2), (16, LOG3), (1, LOG4)])[None],
              piecewise([(31, 0.0), (16, 0.0), (16, 0.5), (16, 1.0), (1, 1.5)])[None]),
    # Positions 76..79.
    "decode": (4, 4, 80, True, np.array([[LOG3, LOG3, LOG3, LOG4]]),
               np.array([[1.0, 1.0, 1.0, 1.5]])),
    # S = 50 gives N_c = 2; positions 46..49.
    "decode-short": (4, 2, 50, True, np.array([[0.0, LOG2, LOG2, LOG2]]),
                     np.array([[0.0, 0.5, 0.5, 0.5]])),
    # Row 0 at positions 30..33 (first query sees nothing), row 1 at 76..79.
    "per-row-kv-len": (4, 4, np.array([34, 80]), True,
                       np.array([[NEG_INF, 0.0, 0.0, 0.0], [LOG3, LOG3, LOG3, LOG4]]),
                       np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.5]])),
    "noncausal": (6, 4, 80, False, np.full((1, 6), LOG4), np.full((1, 6), 1.5)),
    # Row 0 holds 50 keys: only tokens 0 and 1 exist for it.
    "noncausal-per-row-kv-len": (4, 4, np.array([50, 80]), False,
                                 np.array([[LOG2] * 4, [LOG4] * 4]),
                                 np.array([[0.5] * 4, [1.5] * 4])),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(COMPRESSED_CASES))
def test_compressed_attention_visibility(case, impl):
    T, N_c, kv_len, causal, lse_bt, o_bt = COMPRESSED_CASES[case]
    B = lse_bt.shape[0]
    q, k_c, v_c = _compressed_inputs(B, T, N_c)
    if isinstance(kv_len, np.ndarray):
        kv_len = jnp.asarray(kv_len, jnp.int32)
    run = jax.jit(lambda q, k_c, v_c, n: nsa_jax.compressed_attention(
        q, k_c, v_c, config=make_cfg(causal=causal), kv_len=n, **KW[impl]),
        static_argnums=() if isinstance(kv_len, jax.Array) else (3,))
    if impl in ("triton", "mosaic") and not causal and isinstance(kv_len, jax.Array):
        # The expected refusal of its `supports`: an explicit backend never falls back.
        with pytest.raises(NotImplementedError,
                           match="non-causal 'compressed' with a per-row kv_len"):
            run(q, k_c, v_c, kv_len)
        return
    o, lse = run(q, k_c, v_c, kv_len)
    chex.assert_shape(lse, (B, T, 2))
    lse = np.asarray(lse)
    expected_lse = np.repeat(lse_bt[..., None], 2, axis=-1)
    # -inf exactly where nothing is visible, finite elsewhere.
    chex.assert_trees_all_equal(np.isneginf(lse), np.isneginf(expected_lse))
    np.testing.assert_allclose(lse, expected_lse, atol=1e-6)
    np.testing.assert_allclose(np.asarray(o)[..., 0], np.repeat(o_bt[..., None], 2, -1), atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_compressed_attention_per_row_kv_len_jit(impl):
    q, k_c, v_c = _compressed_inputs(2, 4, 4)
    f = jax.jit(lambda q, k_c, v_c, n: nsa_jax.compressed_attention(
        q, k_c, v_c, config=make_cfg(), kv_len=n, **KW[impl]))
    _, lse = f(q, k_c, v_c, jnp.array([34, 80], jnp.int32))
    expected = np.array([[NEG_INF, 0.0, 0.0, 0.0], [LOG3, LOG3, LOG3, LOG4]])
    np.testing.assert_allclose(np.asarray(lse)[..., 0], expected, atol=1e-6)
    # A different length per row reuses the compiled function.
    _, lse = f(q, k_c, v_c, jnp.array([80, 34], jnp.int32))
    np.testing.assert_allclose(np.asarray(lse)[..., 0], expected[::-1], atol=1e-6)


# One compressed token per head dimension: logit(t, i) = q[t, i] (scale = 1). A query pointing at
# token i with weight 40 puts all but ~e^-40 of its mass on it, so block scores are exactly the
# token's overlap with each block (1, or 0.5 / 0.5 for a token straddling two blocks).
# Tokens used: 5 -> keys [80, 112) in block 1; 7 -> [112, 144), half in 1, half in 2;
# 9 -> [144, 176) in block 2; 11 -> [176, 208), half in 2, half in 3; 13 -> [208, 240) in block 3.
E2E_CFG = dict(num_selected=3, num_initial=1, num_local=1)
# The reference ignores a given lse, so only the fast paths are run both ways.
SELECT_IMPLS = [pytest.param(name, with_lse, id=name + ("-lse" if with_lse else ""))
                for name in IMPLS for with_lse in ((False, True) if name != "reference" else (False,))]


def _pointing_queries(T, D, spans, heads=1):
    """spans: [(t0, t1, {token: logit}) or (t0, t1, [{token: logit} per head])]."""
    q = np.zeros((1, T, heads, D), np.float32)
    for t0, t1, w in spans:
        for h, wh in enumerate(w if isinstance(w, list) else [w] * heads):
            for tok, val in wh.items():
                q[0, t0:t1, h, tok] = val
    return jnp.asarray(q)


def _one_hot_keys(N_c, D):
    return jnp.asarray(np.eye(N_c, D, dtype=np.float32)[None, :, None, :])


def _select(q, k_c, cfg, impl, with_lse=False):
    def f(q, k_c):
        lse = None
        if with_lse:
            _, lse = nsa_jax.compressed_attention(q, k_c, k_c, config=cfg, **KW[impl])
        return nsa_jax.select_blocks(q, k_c, config=cfg, lse=lse, **KW[impl])
    return jax.jit(f)(q, k_c)


# T = S = 320: 19 compressed tokens, 5 blocks. With one initial and one local block the forced set
# is {0, own block}; at most one slot is free, and only from t = 192 on is there a choice.
PER_TOKEN_SPANS = [
    (0, 192, {9: 40.0}),
    (192, 232, {5: 40.0}),
    (232, 256, {9: 40.0}),
    (256, 272, {13: 40.0, 5: 30.0}),
    (272, 288, {5: 40.0, 13: 30.0}),
    (288, 304, {7: 40.0}),   # exact tie between blocks 1 and 2 -> 1
    (304, 320, {11: 40.0}),  # exact tie between blocks 2 and 3 -> 2
]
PER_TOKEN_EXPECTED = piecewise([
    (64, [0, -1, -1]),
    (64, [0, 1, -1]),
    (64, [0, 1, 2]),
    (40, [0, 1, 3]),
    (24, [0, 2, 3]),
    (16, [0, 3, 4]),
    (16, [0, 1, 4]),
    (16, [0, 1, 4]),
    (16, [0, 2, 4]),
])


@pytest.mark.parametrize("impl,with_lse", SELECT_IMPLS)
def test_select_blocks_per_token(impl, with_lse):
    cfg = make_cfg(**E2E_CFG)
    q = _pointing_queries(320, 20, PER_TOKEN_SPANS)
    sel = _select(q, _one_hot_keys(19, 20), cfg, impl, with_lse=with_lse)
    assert (sel.q_tile, sel.block_size) == (1, 64)
    chex.assert_shape(sel.indices, (1, 1, 320, 3))
    chex.assert_trees_all_equal(np.asarray(sel.indices)[0, 0], PER_TOKEN_EXPECTED.astype(np.int32))
    chex.assert_trees_all_equal(np.asarray(sel.counts)[0, 0],
                                (PER_TOKEN_EXPECTED >= 0).sum(-1).astype(np.int32))


@pytest.mark.parametrize("impl", IMPLS)
def test_select_blocks_group_shares_the_choice(impl):
    # Head 0 alone prefers token 9 (block 2: e^40 vs e^39 -> 0.73 / 0.27); head 1 puts all its
    # mass on token 13 (block 3). Summed over the group block 3 wins (1.27 vs 0.73) from t = 256.
    cfg = make_cfg(**E2E_CFG)
    k_c = _one_hot_keys(19, 20)
    q = _pointing_queries(320, 20, [(0, 320, [{9: 40.0, 13: 39.0}, {13: 40.0}])], heads=2)
    sel, alone = jax.jit(lambda q, k_c: (
        nsa_jax.select_blocks(q, k_c, config=cfg, **KW[impl]),
        nsa_jax.select_blocks(q[:, :, :1], k_c, config=cfg, **KW[impl])))(q, k_c)
    expected = piecewise([(64, [0, -1, -1]), (64, [0, 1, -1]), (64, [0, 1, 2]),
                          (64, [0, 2, 3]), (64, [0, 3, 4])])
    chex.assert_trees_all_equal(np.asarray(sel.indices)[0, 0], expected.astype(np.int32))
    chex.assert_trees_all_equal(np.asarray(alone.indices)[0, 0, 256:],
                                np.tile(np.array([0, 2, 4], np.int32), (64, 1)))


# Tile 3 (t 192..255): 40 queries on token 5 (block 1) vs 24 on token 9 (block 2) -> block 1.
# Tile 4 (t 256..319): 40 queries on token 9 (block 2) vs 24 on token 13 (block 3) -> block 2.
TILED_SPANS = [
    (0, 192, {9: 40.0}),
    (192, 232, {5: 40.0}),
    (232, 256, {9: 40.0}),
    (256, 296, {9: 40.0}),
    (296, 320, {13: 40.0}),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("q_tile,expected,counts", [
    pytest.param(64, [[0, -1, -1], [0, 1, -1], [0, 1, 2], [0, 1, 3], [0, 2, 4]],
                 [1, 2, 3, 3, 3], id="tile64"),
    # Tile 1 (128..255) overlaps blocks 2 and 3: forced {0, 2, 3} fills it.
    pytest.param(128, [[0, 1, -1], [0, 2, 3], [0, 2, 4]], [2, 3, 3], id="tile128"),
])
def test_select_blocks_tiled(q_tile, expected, counts, impl):
    cfg = make_cfg(select_q_tile=q_tile, **E2E_CFG)
    q = _pointing_queries(320, 20, TILED_SPANS)
    sel = _select(q, _one_hot_keys(19, 20), cfg, impl, with_lse=impl != "reference")
    assert (sel.q_tile, sel.block_size) == (q_tile, 64)
    chex.assert_trees_all_equal(np.asarray(sel.indices)[0, 0], np.array(expected, np.int32))
    chex.assert_trees_all_equal(np.asarray(sel.counts)[0, 0], np.array(counts, np.int32))


# T = 130, q_tile = 64: 3 tiles, the last holding queries 128 and 129 only. Row 0 has S = 130
# (positions 0..129, 3 blocks); row 1 has S = 200 (positions 70..199, 4 blocks). k_c carries
# 11 tokens (enough for S = 200); every query points at token 5 (block 1, visible from 111).
ODD_T_EXPECTED = np.array([
    [[0, -1, -1], [0, 1, -1], [0, 1, 2]],  # tiles at 0..63, 64..127, 128..129
    [[0, 1, 2], [0, 2, 3], [0, 1, 3]],     # tiles at 70..133, 134..197, 198..199
], np.int32)
ODD_T_COUNTS = np.array([[1, 2, 3], [3, 3, 3]], np.int32)


@pytest.mark.parametrize("impl", IMPLS)
def test_select_blocks_odd_T_per_row_kv_len(impl):
    cfg = make_cfg(select_q_tile=64, **E2E_CFG)
    q = jnp.broadcast_to(_pointing_queries(130, 16, [(0, 130, {5: 40.0})]), (2, 130, 1, 16))
    k_c = jnp.broadcast_to(_one_hot_keys(11, 16), (2, 11, 1, 16))
    f = jax.jit(lambda q, k_c, n: nsa_jax.select_blocks(q, k_c, config=cfg, kv_len=n,
                                                     **KW[impl]))
    sel = f(q, k_c, jnp.array([130, 200], jnp.int32))
    chex.assert_shape(sel.indices, (2, 1, 3, 3))
    chex.assert_trees_all_equal(np.asarray(sel.indices)[:, 0], ODD_T_EXPECTED)
    chex.assert_trees_all_equal(np.asarray(sel.counts)[:, 0], ODD_T_COUNTS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("q_tile,n_tiles", [(1, 130), (64, 3), (128, 2), (256, 1)])
def test_number_of_tiles(q_tile, n_tiles, impl):
    cfg = make_cfg(select_q_tile=q_tile, num_selected=8)
    q = jax.ShapeDtypeStruct((1, 130, 2, 8), jnp.float32)
    k_c = jax.ShapeDtypeStruct((1, 7, 1, 8), jnp.float32)
    sel = jax.eval_shape(lambda q, k_c: nsa_jax.select_blocks(q, k_c, config=cfg,
                                                              **KW[impl]), q, k_c)
    chex.assert_shape(sel.indices, (1, 1, n_tiles, 8))
    chex.assert_shape(sel.counts, (1, 1, n_tiles))
    assert sel.num_tiles == n_tiles


@pytest.mark.parametrize("impl", IMPLS)
def test_unaligned_decode_tile_keeps_its_own_blocks(impl):
    # T = 64, S = 224: the one tile sits at 160..223. It overlaps blocks 2 and 3, adds block 1
    # (num_local = 2) and block 0 (initial): 4 forced for n = 3. The tile's own blocks win; of
    # the other forced ones the lower id (the initial block) takes the last slot.
    cfg = make_cfg(select_q_tile=64, num_selected=3, num_initial=1, num_local=2)
    q = jnp.zeros((1, 64, 1, 16), jnp.float32)
    k_c = jnp.zeros((1, 13, 1, 16), jnp.float32)
    sel = jax.jit(lambda q, k_c: nsa_jax.select_blocks(q, k_c, config=cfg, kv_len=224,
                                                       **KW[impl]))(q, k_c)
    chex.assert_trees_all_equal(np.asarray(sel.indices), i32([[[[0, 2, 3]]]]))
