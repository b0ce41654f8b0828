"""Tilings: validation, defaults per GPU generation, and that a non-default tiling changes nothing
but speed."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

import nsa_jax
from nsa_jax import reference
from nsa_jax.kernels.triton import tiling as tiling_mod
from tests.conftest import FWD_TOL, IMPLEMENTATIONS, assert_close

TRITON = IMPLEMENTATIONS["triton"]


@pytest.mark.parametrize("field,value", [("rows", 8), ("rows", 48), ("block_k", 8), ("block_k", 96),
                                         ("num_warps", 3), ("num_stages", 0), ("rows", True)])
def test_tiling_rejects(field, value):
    with pytest.raises(ValueError, match=f"Tiling.{field}"):
        nsa_jax.Tiling(**{field: value})


def test_triton_tilings_rejects_non_tiling():
    with pytest.raises(TypeError, match="TritonTilings.window"):
        nsa_jax.TritonTilings(window=(64, 64))


def test_tilings_argument_type_checked():
    cfg = nsa_jax.NSAConfig()
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(TypeError, match="tilings must be an nsa_jax.MosaicTilings or nsa_jax.TritonTilings"):
        nsa_jax.sliding_window_attention(q, q, q, config=cfg, tilings={"window": 1})


def test_flash_config_from_tiling():
    t = nsa_jax.Tiling(rows=128, block_k=64, num_warps=8, num_stages=3)
    assert t.flash(16).block_q == 8
    assert t.flash(5).block_q == 16  # G padded to 8
    assert t.flash(256).block_q == 1
    assert t.flash(1, q_tile=24).block_q == 8  # must divide the selection tile
    assert t.flash(1, block_k_divides=48).block_k == 16
    assert (t.flash(2).num_warps, t.flash(2).num_stages) == (8, 3)


def test_default_by_generation():
    hopper = types.SimpleNamespace(compute_capability="9.0")
    ampere = types.SimpleNamespace(compute_capability="8.0")
    cpu = types.SimpleNamespace()
    assert nsa_jax.default_tilings(hopper) is tiling_mod.SM90
    assert nsa_jax.default_tilings(ampere) is tiling_mod.GENERIC
    assert nsa_jax.default_tilings(cpu) is tiling_mod.GENERIC


def test_other_tiling_same_result():
    """A different tiling (more rows, smaller KV blocks) gives the reference's result too."""
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=32, num_selected=3,
                            window=40, select_q_tile=16)
    B, T, HQ, H, D = 1, 77, 4, 2, 16
    ks = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(ks[0], (B, T, HQ, D))
    k = jax.random.normal(ks[1], (B, T, H, D))
    v = jax.random.normal(ks[2], (B, T, H, D))
    g = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, HQ, 3)))
    small = nsa_jax.Tiling(rows=16, block_k=16, num_warps=4, num_stages=1)
    big = nsa_jax.Tiling(rows=128, block_k=32, num_warps=8, num_stages=3)
    tilings = nsa_jax.TritonTilings(compressed=big, selected=small, window=big, scoring=small)
    out = nsa_jax.nsa_attention(q, k, v, g, config=cfg, tilings=tilings, **TRITON)
    ref = reference.nsa_attention(q, k, v, g, config=cfg)
    assert_close(out, ref, FWD_TOL[jnp.float32])
