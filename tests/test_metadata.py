"""Compact block-sparse metadata on small hand-computed cases (docs/design.md §4)."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import metadata
from conftest import WRAPS, bsi, i32


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
    sel = wrap(lambda x: metadata.from_per_token(x, 64, 6))(per_token)
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


def test_from_per_token_ignores_ids_past_the_blocks():
    # With 4 blocks, ids 4 and 9 name no keys: ignored like -1.
    sel = metadata.from_per_token(jnp.array([[[[3, 9, 1, 4]]]], jnp.int32), 64, 4)
    chex.assert_trees_all_equal(np.asarray(sel.indices), i32([[[[1, 3, -1, -1]]]]))
    chex.assert_trees_all_equal(np.asarray(sel.counts), i32([[[2]]]))


@pytest.mark.parametrize("wrap", WRAPS)
def test_normalize_reads_indices_as_the_contract_says(wrap):
    # Row 0: counts 2 -> only [5, 1]; row 1: counts 9 clamps to 4, 7 is past 6 blocks, the
    # duplicate 2 counts once; row 2: negative counts -> nothing; row 3: -1 in the middle.
    sel = bsi([[[[5, 1, 3, 0], [2, 7, 2, 0], [1, 2, 3, 4], [4, -1, 0, -1]]]],
              [[[2, 9, -3, 3]]])
    out = wrap(lambda s: metadata.normalize(s, 6))(sel)
    assert (out.q_tile, out.block_size) == (sel.q_tile, sel.block_size)
    chex.assert_trees_all_equal(np.asarray(out.indices), i32(
        [[[[1, 5, -1, -1], [0, 2, -1, -1], [-1, -1, -1, -1], [0, 4, -1, -1]]]]))
    chex.assert_trees_all_equal(np.asarray(out.counts), i32([[[2, 2, 0, 2]]]))
    # Indices already in that form come back unchanged.
    again = wrap(lambda s: metadata.normalize(s, 6))(out)
    chex.assert_trees_all_equal((again.indices, again.counts), (out.indices, out.counts))


def test_expand_drops_tiles_past_the_keys():
    # S = 100 keys: 2 blocks of 64, 7 tiles of 16. Block 1 expands to tiles 4..7; tile 7 holds
    # keys 112.. and is dropped.
    sel = bsi([[[[0, 1, -1]]]], [[[2]]], block_size=64)
    out = metadata.reblock(sel, 16, num_kv_blocks=7)
    chex.assert_trees_all_equal(np.asarray(out.indices), i32(
        [[[[0, 1, 2, 3, 4, 5, 6, -1, -1, -1, -1, -1]]]]))
    chex.assert_trees_all_equal(np.asarray(out.counts), i32([[[7]]]))
