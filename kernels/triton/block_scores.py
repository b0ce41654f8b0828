"""Compressed attention mass per query tile (Triton lowering): the input of block scoring.

Given the compressed branch's log-sum-exp, a program recomputes the probabilities of its rows
(queries x the G heads of one KV head, as in the forward) against the compressed tokens and sums
them over the rows. Summing over a selection tile's sub-tiles and mapping compressed tokens onto
selection blocks is linear and cheap, so it stays in XLA; no [T, N_c] array is ever formed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nsa_jax.kernels.common import LOG2E, Launch, MaskRule, Program, bounded_ranges, read_bounds
from nsa_jax.kernels.triton.flash_bwd import probabilities
from nsa_jax.kernels.triton.flash_fwd import FlashConfig, dot_precision


def _mass_kernel(off_ref, lse_ref, q_ref, k_ref, bounds, out_ref, *, prog: Program):
    b, i = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]  # [rows, D]
    lse2 = lse_ref[...] * LOG2E  # [rows]; +inf for rows that must not count
    prec = dot_precision(q.dtype)
    first = off_ref[b] + i * prog.block_q
    q_pos = prog.q_pos(first)
    bounds = read_bounds(bounds)
    bk = prog.block_k

    def visit(blk, carry, masked=True):
        start = prog.start(blk)
        k = k_ref[pl.ds(start, bk), :]  # [BK, D]
        p = probabilities(prog, q, k, lse2, q_pos, start, prec=prec, masked=masked, bounds=bounds)
        out_ref[pl.ds(start, bk)] = jnp.sum(p, axis=0)
        return carry

    def clear(blk, carry):
        out_ref[pl.ds(prog.start(blk), bk)] = jnp.zeros((bk,), jnp.float32)
        return carry

    # The output starts undefined: blocks no row can see are cleared.
    lo, hi = bounded_ranges(prog.rule, first, first + prog.block_q - 1, bk, bounds)[:2]
    lax.fori_loop(0, lo, clear, 0)
    prog.walk(first, visit, 0, bounds=bounds)
    lax.fori_loop(hi, prog.num_kv_blocks, clear, 0)


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
    B, T = q.shape[:2]
    N_c, H = k_c.shape[1], k_c.shape[2]
    n_tiles = -(-T // q_tile)
    if N_c == 0 or T == 0:
        return jnp.zeros((B, H, n_tiles, N_c), jnp.float32)
    bq = min(config.block_q, q_tile & -q_tile)
    lay = Launch.of(q, k_c, block_q=bq, block_k=config.block_k, q_unit=q_tile)
    bound_specs, bound_args = lay.bound_inputs(bounds)
    k_spec, k_in = lay.keys(k_c, lay.D_p)
    mass = pl.pallas_call(
        functools.partial(_mass_kernel, prog=lay.program(rule, scale)),
        grid=(B, H, lay.num_q_tiles),
        in_specs=(pl.BlockSpec(), lay.tile_spec(), lay.tile_spec(lay.D_p), k_spec, bound_specs),
        out_specs=pl.BlockSpec((None, None, None, lay.N_p), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, lay.num_q_tiles, lay.N_p), jnp.float32),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="nsa_compressed_mass",
    )(offsets.astype(jnp.int32), lay.group_lse(lse), lay.group(q, lay.D_p), k_in, bound_args)
    mass = mass.reshape(B, H, n_tiles, q_tile // bq, lay.N_p).sum(axis=3)
    return mass[..., :N_c]
