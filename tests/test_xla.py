"""Cases specific to the "xla" backend: query positions, compressed visibility, and peak memory
that grows O(T) where the dense reference's grows O(T * S)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax.ops import xla
from conftest import WRAPS, make_cfg


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


CFG = nsa_jax.NSAConfig(window=128, num_selected=8, select_q_tile=64)


def _temp_bytes(fn, T: int, *, grad: bool = False) -> int:
    q = jax.ShapeDtypeStruct((1, T, 4, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, T, 1, 32), jnp.float32)
    target = jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)) if grad else fn
    stats = jax.jit(target).lower(q, kv, kv).compile().memory_analysis()
    return stats.temp_size_in_bytes


def _xla(q, k, v):
    return nsa_jax.nsa_attention(q, k, v, config=CFG, implementation="xla")


def _reference(q, k, v):
    return nsa_jax.nsa_attention(q, k, v, config=CFG, implementation="reference")


def test_xla_forward_memory_is_linear_in_T():
    small, large = _temp_bytes(_xla, 4096), _temp_bytes(_xla, 16384)
    # 4x the length: linear growth gives ~4x, quadratic 16x.
    assert large <= 5 * small, (small, large)


def test_xla_backward_memory_is_linear_in_T():
    small, large = _temp_bytes(_xla, 4096, grad=True), _temp_bytes(_xla, 16384, grad=True)
    assert large <= 5 * small, (small, large)


def test_reference_memory_is_far_larger():
    """Shows the measurement can tell the two apart: the dense reference materialises [T, S]
    arrays (its growth from 1k to 4k is 16x on CPU, 7-11x on an H100, where XLA fuses more)."""
    assert _temp_bytes(_reference, 4096) >= 10 * _temp_bytes(_xla, 4096)
