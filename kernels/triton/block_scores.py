"""Compressed attention mass per query tile (Pallas, Triton lowering): the input of block scoring.

Given the compressed branch's log-sum-exp, a program recomputes the logits of its rows (queries x
the G heads of one KV head) against the compressed tokens, turns them into probabilities and sums
them over the rows. Summing over a selection tile's sub-tiles and mapping compressed tokens onto
selection blocks is linear and cheap, so it stays in XLA; no [T, N_c] array is ever formed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax.kernels.triton.flash_fwd import (LOG2E, FlashConfig, MaskRule, bound_rows, bounded_ranges,
                                       group_rows, heads_major, pow2, split_bounds, visible,
                                       walk_range)


def _mass_kernel(*refs, rule: MaskRule, scale: float, G: int, block_q: int, block_k: int,
                 num_kv_blocks: int, bounded: bool):
    (off_ref, lse_ref, q_ref, k_ref, out_ref), bounds = split_bounds(refs, bounded, 1)
    b, i = pl.program_id(0), pl.program_id(2)
    rows = q_ref.shape[0]
    q = q_ref[...]  # [rows, D]
    lse2 = lse_ref[...] * LOG2E  # [rows]; +inf for rows that must not count
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    first = off_ref[b] + i * block_q
    last = first + block_q - 1
    q_pos = first + lax.broadcasted_iota(jnp.int32, (rows,), 0) // G
    scale2 = scale * LOG2E

    def visit(blk, carry, masked=True):
        start = pl.multiple_of(blk * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]  # [BK, D]
        s = pltriton.dot(q, k, trans_b=True, precision=prec).astype(jnp.float32) * scale2  # [rows, BK]
        p = jnp.exp2(s - lse2[:, None])
        if masked:
            p = jnp.where(visible(rule, q_pos, start, block_k, bounds), p, 0.0)
        out_ref[pl.ds(start, block_k)] = jnp.sum(p, axis=0)
        return carry

    def clear(blk, carry):
        out_ref[pl.ds(pl.multiple_of(blk * block_k, block_k), block_k)] = jnp.zeros(
            (block_k,), jnp.float32)
        return carry

    lo, hi = bounded_ranges(rule, first, last, block_k, bounds)[:2]
    lax.fori_loop(0, lo, clear, 0)
    walk_range(rule, first, last, block_k, visit, 0, bounds)
    lax.fori_loop(hi, num_kv_blocks, clear, 0)


def compressed_mass(q, k_c, lse, offsets, *, rule: MaskRule, scale: float, q_tile: int,
                    config: FlashConfig, bounds=None, interpret: bool = False):
    """Compressed probability mass per query tile, summed over the tile's queries and G heads.

    Args:
      q: [B, T, HQ, D]; k_c: [B, N_c, H, D]; lse: [B, T, HQ] float32 from the compressed branch.
      offsets: int32[B], key position of query 0.
      rule: visibility of compressed tokens (stride d, offset l - 1).
      q_tile: queries per selection tile.
      config: tiling; ``block_q`` is lowered to the largest power of two dividing ``q_tile``.
      bounds: optional (lo, hi) int32 [B, T]: query t sees compressed tokens lo[t] .. hi[t] - 1.

    Returns:
      float32 [B, H, ceil(T / q_tile), N_c].
    """
    B, T, HQ, D = q.shape
    N_c, H = k_c.shape[1], k_c.shape[2]
    G = HQ // H
    n_tiles = -(-T // q_tile)
    if N_c == 0 or T == 0:
        return jnp.zeros((B, H, n_tiles, N_c), jnp.float32)
    G_p, D_p, bk = pow2(G), max(16, pow2(D)), config.block_k
    bq = min(config.block_q, q_tile & -q_tile)
    if bq * G_p < 16:  # tl.dot needs at least 16 rows: pad the group with zero heads
        G_p = 16 // bq
    rows = bq * G_p
    T_p = n_tiles * q_tile
    n_kb = -(-N_c // bk)
    qg = group_rows(q, H, T_p, G_p, D_p)
    # Padded rows get lse = +inf, so their probabilities are exactly zero; so do rows that see no
    # compressed token (lse = -inf).
    lse_g = jnp.where(jnp.isfinite(lse), lse, jnp.inf)[..., None]  # [B, T, HQ, 1]
    lse_g = group_rows(lse_g, H, T_p, G_p, 1)[..., 0]  # [B, H, T_p * G_p], zero padded
    row = jnp.arange(T_p * G_p)
    real = ((row // G_p) < T) & ((row % G_p) < G)
    lse_g = jnp.where(real, lse_g, jnp.inf)
    kh = heads_major(k_c, n_kb * bk, D_p)
    kernel = functools.partial(_mass_kernel, rule=rule, scale=scale, G=G_p, block_q=bq,
                               block_k=bk, num_kv_blocks=n_kb, bounded=bounds is not None)
    n_sub = T_p // bq
    in_specs = [pl.BlockSpec(),
                pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, i)),
                pl.BlockSpec((None, None, rows, D_p), lambda b, h, i: (b, h, i, 0)),
                pl.BlockSpec((None, None, n_kb * bk, D_p), lambda b, h, i: (b, h, 0, 0))]
    args = [offsets.astype(jnp.int32), lse_g, qg, kh]
    if bounds is not None:
        in_specs += [pl.BlockSpec((None, rows), lambda b, h, i: (b, i))] * 2
        args += list(bound_rows(bounds, T_p, G_p))
    mass = pl.pallas_call(
        kernel,
        grid=(B, H, n_sub),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, None, n_kb * bk), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, n_sub, n_kb * bk), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                                num_stages=config.num_stages),
        interpret=interpret,
        name="nsa_compressed_mass",
    )(*args)
    mass = mass.reshape(B, H, n_tiles, q_tile // bq, n_kb * bk).sum(axis=3)
    return mass[..., :N_c]
