"""Selection and block-sparse metadata on small hand-computed cases (DESIGN.md §3 and §4).

Every expected array below was worked out by hand from the rules in DESIGN.md, never by running
the code under test. Geometry used throughout unless a test says otherwise: l = 32, d = 16, so
compressed token i covers keys [16 i, 16 i + 32) and its last key is 16 i + 31; l' = 64, so
selection block j covers keys [64 j, 64 j + 64).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import metadata, reference
from nsa_jax.ops import xla
from nsa_jax.metadata import BlockSparseIndices

IMPLS = ["xla", "reference"]
NEG_INF = -np.inf
LOG2, LOG3, LOG4 = math.log(2.0), math.log(3.0), math.log(4.0)


def make_cfg(**overrides):
    kw = dict(compress_block=32, compress_stride=16, select_block=64, num_selected=8,
              num_initial=1, num_local=2, window=0, scale=1.0)
    kw.update(overrides)
    return nsa_jax.NSAConfig(**kw)


def block_mask(sets, n):
    """Rows of block-id sets -> bool [len(sets), n]; lets expected masks read as id sets."""
    out = np.zeros((len(sets), n), bool)
    for r, s in enumerate(sets):
        out[r, sorted(s)] = True
    return out


def piecewise(spans):
    """[(length, row), ...] -> rows repeated `length` times, so per-token tables stay short."""
    return np.concatenate([np.tile(np.asarray(row)[None], (n,) + (1,) * np.ndim(row))
                           for n, row in spans])


def i32(x):
    return np.array(x, np.int32)


def bsi(indices, counts, q_tile=1, block_size=64):
    return BlockSparseIndices(jnp.asarray(indices, jnp.int32), jnp.asarray(counts, jnp.int32),
                              q_tile=q_tile, block_size=block_size)


def identity(f):
    return f


WRAPS = [pytest.param(identity, id="eager"), pytest.param(jax.jit, id="jit")]


def test_query_positions_follow_kv_len():
    # Query t sits at key t + (S - T); with per-row lengths each row gets its own offset.
    pos = xla.query_positions(2, 3, 80, jnp.array([33, 80], jnp.int32))
    chex.assert_trees_all_equal(np.asarray(pos), np.array([[30, 31, 32], [77, 78, 79]]))
    pos = xla.query_positions(1, 3, 50)
    chex.assert_trees_all_equal(np.asarray(pos), np.array([[47, 48, 49]]))


@pytest.mark.parametrize("wrap", WRAPS)
def test_compressed_visible_causal(wrap):
    # Last keys of tokens 0..3 are 31, 47, 63, 79: a token is visible once its last key is past.
    pos = jnp.array([[0, 30, 31, 46, 47, 62, 63, 79]], jnp.int32)
    vis = wrap(lambda p: xla.compressed_visible(p, 4, make_cfg()))(pos)
    expected = np.array([[[0, 0, 0, 0],
                          [0, 0, 0, 0],
                          [1, 0, 0, 0],
                          [1, 0, 0, 0],
                          [1, 1, 0, 0],
                          [1, 1, 0, 0],
                          [1, 1, 1, 0],
                          [1, 1, 1, 1]]], bool)
    chex.assert_trees_all_equal(np.asarray(vis), expected)


def test_compressed_visible_noncausal_sees_all():
    pos = jnp.array([[0, 5], [3, 79]], jnp.int32)
    vis = xla.compressed_visible(pos, 4, make_cfg(causal=False))
    chex.assert_trees_all_equal(np.asarray(vis), np.ones((2, 2, 4), bool))


def test_compressed_visible_noncausal_per_row_length():
    # Row 0 holds 50 keys, so only tokens 0 and 1 (last keys 31, 47) exist for it; the others
    # are padding of the shared k_c and must not be seen.
    pos = jnp.array([[0, 49], [0, 79]], jnp.int32)
    vis = xla.compressed_visible(pos, 4, make_cfg(causal=False), jnp.array([50, 80], jnp.int32))
    expected = np.array([[[1, 1, 0, 0], [1, 1, 0, 0]],
                         [[1, 1, 1, 1], [1, 1, 1, 1]]], bool)
    chex.assert_trees_all_equal(np.asarray(vis), expected)


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
    o, lse = jax.jit(lambda q, k_c, v_c, n: nsa_jax.compressed_attention(
        q, k_c, v_c, config=make_cfg(causal=causal), kv_len=n, implementation=impl),
        static_argnums=() if isinstance(kv_len, jax.Array) else (3,))(q, k_c, v_c, kv_len)
    chex.assert_shape(lse, (B, T, 2))
    lse = np.asarray(lse)
    expected_lse = np.repeat(lse_bt[..., None], 2, axis=-1)
    # -inf exactly where nothing is visible, finite elsewhere.
    chex.assert_trees_all_equal(np.isneginf(lse), np.isneginf(expected_lse))
    np.testing.assert_allclose(lse, expected_lse, atol=1e-6)
    np.testing.assert_allclose(np.asarray(o)[..., 0], np.repeat(o_bt[..., None], 2, -1), atol=1e-6)


def test_compressed_attention_per_row_kv_len_jit():
    q, k_c, v_c = _compressed_inputs(2, 4, 4)
    f = jax.jit(lambda q, k_c, v_c, n: nsa_jax.compressed_attention(
        q, k_c, v_c, config=make_cfg(), kv_len=n, implementation="xla"))
    _, lse = f(q, k_c, v_c, jnp.array([34, 80], jnp.int32))
    expected = np.array([[NEG_INF, 0.0, 0.0, 0.0], [LOG3, LOG3, LOG3, LOG4]])
    np.testing.assert_allclose(np.asarray(lse)[..., 0], expected, atol=1e-6)
    # A different length per row reuses the compiled function.
    _, lse = f(q, k_c, v_c, jnp.array([80, 34], jnp.int32))
    np.testing.assert_allclose(np.asarray(lse)[..., 0], expected[::-1], atol=1e-6)


# A probability vector over 11 compressed tokens (S = 192), in 64ths so every sum is exact.
P11 = np.array([4, 2, 1, 8, 3, 5, 6, 10, 7, 9, 9], np.float32) / 64


def test_block_scores_equal_probs_when_l_d_lprime_agree():
    cfg = make_cfg(compress_block=32, compress_stride=32, select_block=32)
    p = jnp.array([[0.5, 0.25, 0.125, 0.125], [0.0, 0.125, 0.375, 0.5]], jnp.float32)
    chex.assert_trees_all_close(np.asarray(xla.block_scores_from_probs(p, cfg, 4)), np.asarray(p))
    # S = 100: 3 compressed tokens, 4 blocks; the partial last block has no compressed token.
    p3 = jnp.array([0.25, 0.25, 0.5], jnp.float32)
    chex.assert_trees_all_close(np.asarray(xla.block_scores_from_probs(p3, cfg, 4)),
                                np.array([0.25, 0.25, 0.5, 0.0], np.float32))


@pytest.mark.parametrize("select_block,N_s,expected", [
    # Block j: p[2j] in full plus half of each neighbour p[2j - 1], p[2j + 1].
    pytest.param(32, 6, [[5, 6, 9.5, 13.5, 16.5, 13.5], [13.5, 16.5, 13.5, 9.5, 6, 5]],
                 id="lprime32"),
    # Block j: p[4j .. 4j + 2] in full plus half of p[4j - 1] and p[4j + 3].
    pytest.param(64, 3, [[11, 23, 30], [30, 23, 11]], id="lprime64"),
])
def test_block_scores_overlapping(select_block, N_s, expected):
    cfg = make_cfg(select_block=select_block)
    p = jnp.asarray(np.stack([P11, P11[::-1]]))
    scores = np.asarray(xla.block_scores_from_probs(p, cfg, N_s))
    chex.assert_trees_all_close(scores, np.array(expected, np.float32) / 64, atol=1e-7)
    # Scores redistribute mass; nothing is lost or created.
    np.testing.assert_allclose(scores.sum(-1), [1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("select_block,N_s,expected", [
    pytest.param(64, 2, [[1, 0], [1, 0], [1, 0], [0.5, 0.5], [0, 1], [0, 1], [0, 1]],
                 id="lprime64"),
    pytest.param(32, 4, [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0.5, 0.5, 0],
                         [0, 0, 1, 0], [0, 0, 0.5, 0.5], [0, 0, 0, 1]], id="lprime32"),
])
def test_overlap_weights(select_block, N_s, expected):
    W = reference.overlap_weights(make_cfg(select_block=select_block), 7, N_s)
    chex.assert_trees_all_equal(W, np.array(expected, np.float32))


def test_overlap_weights_match_block_scores_from_probs():
    cfg = make_cfg(select_block=64)
    W = reference.overlap_weights(cfg, 11, 3)
    np.testing.assert_allclose(P11 @ W, np.array([11, 23, 30]) / 64, atol=1e-7)


def test_reference_block_scores_per_token_and_tile():
    # l = d = l' = 32, T = S = 128, zero keys: each query spreads its mass evenly over the
    # tokens it sees (token i visible from t = 32 i + 31).
    cfg = make_cfg(compress_block=32, compress_stride=32, select_block=32)
    q = jnp.ones((1, 128, 1, 4), jnp.float32)
    k_c = jnp.zeros((1, 4, 1, 4), jnp.float32)
    s = np.asarray(jax.jit(lambda q, k_c: reference.block_scores(q, k_c, config=cfg))(q, k_c))
    chex.assert_shape(s, (1, 1, 128, 4))
    np.testing.assert_allclose(s[0, 0, [30, 31, 63, 95, 127]],
                               [[0, 0, 0, 0], [1, 0, 0, 0], [0.5, 0.5, 0, 0],
                                [1 / 3, 1 / 3, 1 / 3, 0], [0.25, 0.25, 0.25, 0.25]], atol=1e-6)
    # Tile 0 (t 0..63): 32 rows [1,0,0,0] (t 31..62) and t = 63 [.5,.5,0,0]. Tile 1: 31 rows of
    # halves (64..94), 32 rows of thirds (95..126), one row of quarters (127).
    cfg = make_cfg(compress_block=32, compress_stride=32, select_block=32, select_q_tile=64)
    s = np.asarray(jax.jit(lambda q, k_c: reference.block_scores(q, k_c, config=cfg))(q, k_c))
    np.testing.assert_allclose(s[0, 0], [[32.5, 0.5, 0, 0],
                                         [15.5 + 32 / 3 + 0.25, 15.5 + 32 / 3 + 0.25,
                                          32 / 3 + 0.25, 0.25]], rtol=1e-6)


ALL6 = set(range(6))
PT_POS = [0, 63, 64, 130, 200, 383]
PT_ELIG = [{0}, {0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, ALL6]
Q64_TILES = [(0, 63), (64, 127), (128, 191), (192, 255),
             (96, 159),  # decode offset 32: the tile straddles blocks 1 and 2
             (128, 129)]  # last tile of T = 130: only two real queries
Q64_ELIG = [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2}, {0, 1, 2}]
Q128_TILES = [(0, 127), (128, 255), (256, 383), (64, 191)]
Q128_ELIG = [{0, 1}, {0, 1, 2, 3}, ALL6, {0, 1, 2}]

# (q_tile, tiles as (first, last) key positions, causal, num_initial, num_local, eligible, forced)
MASK_CASES = {
    "pt-causal-i0-l0": (1, PT_POS, True, 0, 0, PT_ELIG, [set()] * 6),
    "pt-causal-i1-l0": (1, PT_POS, True, 1, 0, PT_ELIG, [{0}] * 6),
    # Block 1 is forced only once it is eligible.
    "pt-causal-i2-l0": (1, PT_POS, True, 2, 0, PT_ELIG, [{0}, {0}, {0, 1}, {0, 1}, {0, 1}, {0, 1}]),
    "pt-causal-i0-l1": (1, PT_POS, True, 0, 1, PT_ELIG, [{0}, {0}, {1}, {2}, {3}, {5}]),
    "pt-causal-i1-l2": (1, PT_POS, True, 1, 2, PT_ELIG,
                        [{0}, {0}, {0, 1}, {0, 1, 2}, {0, 2, 3}, {0, 4, 5}]),
    "pt-causal-i0-l3": (1, PT_POS, True, 0, 3, PT_ELIG,
                        [{0}, {0}, {0, 1}, {0, 1, 2}, {1, 2, 3}, {3, 4, 5}]),
    "pt-causal-i2-l3": (1, PT_POS, True, 2, 3, PT_ELIG,
                        [{0}, {0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 3, 4, 5}]),
    "pt-noncausal-i2-l0": (1, PT_POS, False, 2, 0, [ALL6] * 6, [{0, 1}] * 6),
    "pt-noncausal-i1-l2": (1, PT_POS, False, 1, 2, [ALL6] * 6,
                           [{0}, {0}, {0, 1}, {0, 1, 2}, {0, 2, 3}, {0, 4, 5}]),
    "pt-noncausal-i2-l3": (1, PT_POS, False, 2, 3, [ALL6] * 6,
                           [{0, 1}, {0, 1}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 3, 4, 5}]),
    "q64-causal-i0-l0": (64, Q64_TILES, True, 0, 0, Q64_ELIG, [set()] * 6),
    "q64-causal-i0-l1": (64, Q64_TILES, True, 0, 1, Q64_ELIG, [{0}, {1}, {2}, {3}, {1, 2}, {2}]),
    "q64-causal-i1-l2": (64, Q64_TILES, True, 1, 2, Q64_ELIG,
                         [{0}, {0, 1}, {0, 1, 2}, {0, 2, 3}, {0, 1, 2}, {0, 1, 2}]),
    "q64-causal-i2-l3": (64, Q64_TILES, True, 2, 3, Q64_ELIG,
                         [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2}, {0, 1, 2}]),
    "q64-noncausal-i2-l0": (64, Q64_TILES, False, 2, 0, [ALL6] * 6, [{0, 1}] * 6),
    "q128-causal-i1-l2": (128, Q128_TILES, True, 1, 2, Q128_ELIG,
                          [{0, 1}, {0, 1, 2, 3}, {0, 3, 4, 5}, {0, 1, 2}]),
    "q128-causal-i0-l3": (128, Q128_TILES, True, 0, 3, Q128_ELIG,
                          [{0, 1}, {0, 1, 2, 3}, {2, 3, 4, 5}, {0, 1, 2}]),
    "q128-causal-i2-l1": (128, Q128_TILES, True, 2, 1, Q128_ELIG,
                          [{0, 1}, {0, 1, 2, 3}, {0, 1, 4, 5}, {0, 1, 2}]),
    "q128-noncausal-i1-l2": (128, Q128_TILES, False, 1, 2, [ALL6] * 4,
                             [{0, 1}, {0, 1, 2, 3}, {0, 3, 4, 5}, {0, 1, 2}]),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_selection_masks(case):
    qt, tiles, causal, ni, nl, elig, forced = MASK_CASES[case]
    cfg = make_cfg(select_q_tile=qt, causal=causal, num_initial=ni, num_local=nl)
    if qt == 1:
        first = last = jnp.array([tiles], jnp.int32)
    else:
        first = jnp.array([[a for a, _ in tiles]], jnp.int32)
        last = jnp.array([[b for _, b in tiles]], jnp.int32)
    e, f = xla.selection_masks(first, last, 6, cfg, jnp.full((1, 1, 1), 6, jnp.int32))
    # Masks that do not depend on the tile may come back broadcastable over it.
    e = np.broadcast_to(np.asarray(e), (1, len(tiles), 6))
    f = np.broadcast_to(np.asarray(f), (1, len(tiles), 6))
    chex.assert_trees_all_equal(e[0], block_mask(elig, 6))
    chex.assert_trees_all_equal(f[0], block_mask(forced, 6))


def test_selection_masks_skip_blocks_past_the_row_length():
    # Row 1 holds 100 keys (2 blocks): blocks 2.. do not exist even non-causally, and a forced
    # initial block that does not exist is skipped.
    cfg = make_cfg(causal=False, num_initial=3, num_local=1)
    pos = jnp.array([[0, 200], [0, 99]], jnp.int32)
    e, f = jax.jit(lambda p, n: xla.selection_masks(p, p, 6, cfg, n))(
        pos, jnp.array([6, 2], jnp.int32)[:, None, None])
    chex.assert_trees_all_equal(np.broadcast_to(np.asarray(e), (2, 2, 6)), np.stack([
        block_mask([ALL6, ALL6], 6), block_mask([{0, 1}, {0, 1}], 6)]))
    chex.assert_trees_all_equal(np.broadcast_to(np.asarray(f), (2, 2, 6)), np.stack([
        block_mask([{0, 1, 2}, {0, 1, 2, 3}], 6), block_mask([{0, 1}, {0, 1}], 6)]))


# (scores, eligible, forced, n, expected ids, expected count)
TOP_CASES = {
    "all-tied": ([1, 1, 1, 1, 1, 1], ALL6, set(), 3, [0, 1, 2], 3),
    "tied-best": ([0.5, 0.9, 0.9, 0.1, 0.9, 0.2], ALL6, set(), 2, [1, 2], 2),
    "forced-low-score": ([0, 0, 5, 5, 0, 0], ALL6, {0, 5}, 3, [0, 2, 5], 3),
    "ineligible-high-score": ([0.3, 0.7, 9, 9, 9, 9], {0, 1}, set(), 4, [0, 1, -1, -1], 2),
    "zero-scores-still-taken": ([0, 0, 0, 0, 0, 0], {0, 1, 2}, set(), 4, [0, 1, 2, -1], 3),
    "sorted-output": ([0.1, 0.3, 0.9, 0.7, 0.8], {0, 1, 2, 3, 4}, {3}, 3, [2, 3, 4], 3),
    "fewer-blocks-than-n": ([0.2, 0.1], {0, 1}, set(), 4, [0, 1, -1, -1], 2),
    "none-eligible": ([0.2, 0.1, 0.5], set(), set(), 3, [-1, -1, -1], 0),
    "only-forced": ([0.2, 0.1, 0.5], {0, 1, 2}, {0, 1, 2}, 3, [0, 1, 2], 3),
}


@pytest.mark.parametrize("case", list(TOP_CASES))
def test_top_blocks(case):
    scores, elig, forced, n, ids, count = TOP_CASES[case]
    N = len(scores)
    got_ids, got_count = jax.jit(lambda s, e, f: xla.top_blocks(s, e, f, n))(
        jnp.array([scores], jnp.float32), jnp.asarray(block_mask([elig], N)),
        jnp.asarray(block_mask([forced], N)))
    chex.assert_type(got_ids, jnp.int32)
    chex.assert_trees_all_equal(np.asarray(got_ids), np.array([ids], np.int32))
    chex.assert_trees_all_equal(np.asarray(got_count), np.array([count], np.int32))


# One compressed token per head dimension: logit(t, i) = q[t, i] (scale = 1). A query pointing at
# token i with weight 40 puts all but ~e^-40 of its mass on it, so block scores are exactly the
# token's overlap with each block (1, or 0.5 / 0.5 for a token straddling two blocks).
# Tokens used: 5 -> keys [80, 112) in block 1; 7 -> [112, 144), half in 1, half in 2;
# 9 -> [144, 176) in block 2; 11 -> [176, 208), half in 2, half in 3; 13 -> [208, 240) in block 3.
E2E_CFG = dict(num_selected=3, num_initial=1, num_local=1)
# The reference ignores a given lse, so only the xla path is run both ways.
SELECT_IMPLS = [pytest.param("xla", False, id="xla"), pytest.param("xla", True, id="xla-lse"),
                pytest.param("reference", False, id="reference")]


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
            _, lse = nsa_jax.compressed_attention(q, k_c, k_c, config=cfg, implementation=impl)
        return nsa_jax.select_blocks(q, k_c, config=cfg, lse=lse, implementation=impl)
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
        nsa_jax.select_blocks(q, k_c, config=cfg, implementation=impl),
        nsa_jax.select_blocks(q[:, :, :1], k_c, config=cfg, implementation=impl)))(q, k_c)
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
    sel = _select(q, _one_hot_keys(19, 20), cfg, impl, with_lse=impl == "xla")
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
                                                     implementation=impl))
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
                                                              implementation=impl), q, k_c)
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
                                                       implementation=impl))(q, k_c)
    chex.assert_trees_all_equal(np.asarray(sel.indices), i32([[[[0, 2, 3]]]]))


@pytest.mark.parametrize("wrap", WRAPS)
def test_expand(wrap):
    sel = bsi([[[[0, 3, -1]]]], [[[2]]], q_tile=64, block_size=64)
    out = wrap(lambda s: metadata.expand(s, 32))(sel)
    assert (out.q_tile, out.block_size) == (64, 32)
    chex.assert_trees_all_equal(np.asarray(out.indices), i32([[[[0, 1, 6, 7, -1, -1]]]]))
    chex.assert_trees_all_equal(np.asarray(out.counts), np.array([[[4]]], np.int32))
    out = wrap(lambda s: metadata.expand(s, 16))(sel)
    chex.assert_trees_all_equal(np.asarray(out.indices), np.array(
        [[[[0, 1, 2, 3, 12, 13, 14, 15, -1, -1, -1, -1]]]], np.int32))
    chex.assert_trees_all_equal(np.asarray(out.counts), np.array([[[8]]], np.int32))


@pytest.mark.parametrize("wrap", WRAPS)
def test_contract(wrap):
    # 32 -> 64: 0 and 1 merge into 0, 2 -> 1, 5 -> 2.
    sel = bsi([[[[0, 1, 2, 5, -1]], [[3, 6, 7, -1, -1]]]], [[[4], [3]]], block_size=32)
    out = wrap(lambda s: metadata.contract(s, 64))(sel)
    assert out.block_size == 64
    chex.assert_trees_all_equal(np.asarray(out.indices), np.array(
        [[[[0, 1, 2, -1, -1]], [[1, 3, -1, -1, -1]]]], np.int32))
    chex.assert_trees_all_equal(np.asarray(out.counts), np.array([[[3], [2]]], np.int32))
    # With 4 blocks of 64 in the sequence no row can hold more than 4 ids.
    out = wrap(lambda s: metadata.contract(s, 64, num_kv_blocks=4))(sel)
    chex.assert_trees_all_equal(np.asarray(out.indices), np.array(
        [[[[0, 1, 2, -1]], [[1, 3, -1, -1]]]], np.int32))
    chex.assert_trees_all_equal(np.asarray(out.counts), np.array([[[3], [2]]], np.int32))
    # 32 -> 128: 0, 1, 2 -> 0 and 5 -> 1; 3 -> 0 and 6, 7 -> 1.
    out = wrap(lambda s: metadata.contract(s, 128, num_kv_blocks=2))(sel)
    chex.assert_trees_all_equal(np.asarray(out.indices), np.array([[[[0, 1]], [[0, 1]]]], np.int32))
    chex.assert_trees_all_equal(np.asarray(out.counts), np.array([[[2], [2]]], np.int32))


def test_contract_bound_larger_than_k_keeps_k():
    sel = bsi([[[[0, 1, 2, 5, -1]]]], [[[4]]], block_size=32)
    out = metadata.contract(sel, 64, num_kv_blocks=10)
    chex.assert_shape(out.indices, (1, 1, 1, 5))


def test_reblock_dispatch():
    sel = bsi([[[[0, 3, -1]]]], [[[2]]], block_size=64)
    assert metadata.reblock(sel, 64) is sel
    small = nsa_jax.reblock(sel, 32)
    chex.assert_trees_all_equal(np.asarray(small.indices), i32([[[[0, 1, 6, 7, -1, -1]]]]))
    big = nsa_jax.reblock(sel, 128, num_kv_blocks=2)
    chex.assert_trees_all_equal(np.asarray(big.indices), np.array([[[[0, 1]]]], np.int32))
    chex.assert_trees_all_equal(np.asarray(big.counts), np.array([[[2]]], np.int32))
    # Expanding then contracting back is the identity.
    back = metadata.reblock(small, 64)
    chex.assert_trees_all_equal(np.asarray(back.indices), i32([[[[0, 3, -1, -1, -1, -1]]]]))
    chex.assert_trees_all_equal(np.asarray(back.counts), np.array([[[2]]], np.int32))


@pytest.mark.parametrize("block_k,fn", [(48, metadata.expand), (96, metadata.contract)])
def test_reblock_rejects_incompatible_sizes(block_k, fn):
    sel = bsi([[[[0, 3, -1]]]], [[[2]]], block_size=64)
    with pytest.raises(ValueError, match=f"block_k={block_k}"):
        fn(sel, block_k)


@pytest.mark.parametrize("wrap", WRAPS)
def test_from_per_token(wrap):
    per_token = jnp.array([[  # [B=1, T=2, H=2, n=4]
        [[3, -1, 1, 3], [-1, -1, -1, -1]],
        [[0, 2, -1, 1], [5, 4, 5, 4]],
    ]], jnp.int32)
    sel = wrap(lambda x: metadata.from_per_token(x, 64))(per_token)
    assert (sel.q_tile, sel.block_size) == (1, 64)
    chex.assert_trees_all_equal(np.asarray(sel.indices), np.array([[  # [B, H, T, n]
        [[1, 3, -1, -1], [0, 1, 2, -1]],
        [[-1, -1, -1, -1], [4, 5, -1, -1]],
    ]], np.int32))
    chex.assert_trees_all_equal(np.asarray(sel.counts), np.array([[[2, 3], [0, 2]]], np.int32))


@pytest.mark.parametrize("wrap", WRAPS)
def test_reverse_map(wrap):
    sel = bsi([[
        [[0, -1], [0, 1], [1, 3]],   # head 0, tiles 0..2
        [[2, 3], [-1, -1], [0, 2]],  # head 1
    ]], [[[1, 2, 2], [2, 0, 2]]], q_tile=64, block_size=64)
    rev = wrap(lambda s: nsa_jax.reverse_map(s, 4))(sel)
    assert isinstance(rev, nsa_jax.ReverseBlockMap)
    assert (rev.q_tile, rev.block_size) == (64, 64)
    # Head 0: block 0 <- tiles 0, 1; block 1 <- 1, 2; block 2 <- none; block 3 <- 2.
    # Head 1: block 0 <- 2; block 1 <- none; block 2 <- 0, 2; block 3 <- 0.
    chex.assert_trees_all_equal(np.asarray(rev.tiles), np.array(
        [[[0, 1, 1, 2, 2, -1], [2, 0, 2, 0, -1, -1]]], np.int32))
    chex.assert_trees_all_equal(np.asarray(rev.offsets), np.array(
        [[[0, 2, 4, 4, 5], [0, 1, 1, 3, 4]]], np.int32))
    chex.assert_trees_all_equal(np.asarray(rev.counts), np.array(
        [[[2, 2, 0, 1], [1, 0, 2, 1]]], np.int32))


def test_reverse_map_per_token_from_expanded():
    # Per-token rows [0, 1], [1, -1], [2, 0] at block 64, expanded to 32: ids 0..5.
    sel = metadata.expand(bsi([[[[0, 1], [1, -1], [0, 2]]]], [[[2, 1, 2]]], block_size=64), 32)
    rev = metadata.reverse_map(sel, 6)
    chex.assert_trees_all_equal(np.asarray(rev.tiles), np.array(
        [[[0, 2, 0, 2, 0, 1, 0, 1, 2, 2, -1, -1]]], np.int32))
    chex.assert_trees_all_equal(np.asarray(rev.offsets), np.array(
        [[[0, 2, 4, 6, 8, 9, 10]]], np.int32))


COMPACT_IDS = [[3, 1, 3, -1, 0], [5, 5, 5, 5, 5], [2, 7, 4, 0, 0], [-1, -1, -1, -1, -1],
               [0, 1, 2, 3, 4], [9, 8, 7, 6, 5]]
COMPACT_VALID = [[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0],
                 [1, 1, 1, 1, 1], [1, 0, 1, 0, 1]]
COMPACT_EXPECTED = [[0, 1, 3, -1, -1], [5, -1, -1, -1, -1], [2, 4, -1, -1, -1],
                    [-1, -1, -1, -1, -1], [0, 1, 2, 3, 4], [5, 7, 9, -1, -1]]
COMPACT_COUNTS = [3, 1, 2, 0, 5, 3]


@pytest.mark.parametrize("wrap", WRAPS)
def test_compact(wrap):
    ids, counts = wrap(metadata.compact)(jnp.array(COMPACT_IDS, jnp.int32),
                                         jnp.array(COMPACT_VALID, bool))
    chex.assert_trees_all_equal(np.asarray(ids), np.array(COMPACT_EXPECTED, np.int32))
    chex.assert_trees_all_equal(np.asarray(counts), np.array(COMPACT_COUNTS, np.int32))


def test_compact_leading_dims():
    ids = jnp.array(COMPACT_IDS, jnp.int32).reshape(2, 3, 5)
    out, counts = metadata.compact(ids, jnp.array(COMPACT_VALID, bool).reshape(2, 3, 5))
    chex.assert_trees_all_equal(np.asarray(out), i32(COMPACT_EXPECTED).reshape(2, 3, 5))
    chex.assert_trees_all_equal(np.asarray(counts), i32(COMPACT_COUNTS).reshape(2, 3))
