"""The selection rules shared by the fast backends (`nsa_jax.ops.selection`) and the reference's
block scores, on small hand-computed cases (docs/design.md §3, Block scores and Selection).

Geometry unless a test says otherwise: l = 32, d = 16, l' = 64 (see test_hand_computed.py).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import reference
from nsa_jax.ops import selection
from conftest import block_mask, make_cfg


# A probability vector over 11 compressed tokens (S = 192), in 64ths so every sum is exact.
P11 = np.array([4, 2, 1, 8, 3, 5, 6, 10, 7, 9, 9], np.float32) / 64


def test_block_scores_equal_probs_when_l_d_lprime_agree():
    cfg = make_cfg(compress_block=32, compress_stride=32, select_block=32)
    p = jnp.array([[0.5, 0.25, 0.125, 0.125], [0.0, 0.125, 0.375, 0.5]], jnp.float32)
    chex.assert_trees_all_close(np.asarray(selection.block_scores(p, cfg, 4)), np.asarray(p))
    # S = 100: 3 compressed tokens, 4 blocks; the partial last block has no compressed token.
    p3 = jnp.array([0.25, 0.25, 0.5], jnp.float32)
    chex.assert_trees_all_close(np.asarray(selection.block_scores(p3, cfg, 4)),
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
    scores = np.asarray(selection.block_scores(p, cfg, N_s))
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


def test_overlap_weights_match_block_scores():
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
    e, f = selection.selection_masks(first, last, 6, cfg, jnp.full((1, 1, 1), 6, jnp.int32))
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
    e, f = jax.jit(lambda p, n: selection.selection_masks(p, p, 6, cfg, n))(
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
    got_ids, got_count = jax.jit(lambda s, e, f: selection.top_blocks(s, e, f, n))(
        jnp.array([scores], jnp.float32), jnp.asarray(block_mask([elig], N)),
        jnp.asarray(block_mask([forced], N)))
    chex.assert_type(got_ids, jnp.int32)
    chex.assert_trees_all_equal(np.asarray(got_ids), np.array([ids], np.int32))
    chex.assert_trees_all_equal(np.asarray(got_count), np.array([count], np.int32))
