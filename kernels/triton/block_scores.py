"""Block scoring's input from the compressed branch (Triton lowering), in two forms.

`compressed_mass`: given the compressed branch's log-sum-exp, a program recomputes the
probabilities of its rows (queries x the G heads of one KV head, as in the forward) against the
compressed tokens and sums them over the rows. Summing over a selection tile's sub-tiles and
mapping compressed tokens onto selection blocks is linear and cheap, so it stays in XLA; no
[T, N_c] array is ever formed.

`scored_block_mass`: a call of few queries (a decode step) has the forward write each row's
probabilities already mapped onto selection blocks, relative to the running maximum of the KV
block they came from (`flash_forward(block_sums=...)`), and this kernel scales them by the final
log-sum-exp and sums the G heads, a chunk of whole KV blocks per program so that about a
thousand programs run at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax.kernels.common import (LOG2E, Launch, MaskRule, Program, bounded_ranges, group_lse,
                                    read_bounds)
from nsa_jax.kernels.triton.flash_bwd import probabilities
from nsa_jax.kernels.triton.flash_fwd import SUMS_UNIT, FlashConfig, dot_precision


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


def _block_mass_kernel(lse_ref, part_ref, tail_ref, top_ref, mass_ref, edge_ref, *, group: int,
                       nkb: int, chunks: int):
    R, width = part_ref.shape
    nbk = width // nkb
    kb = (pl.program_id(2) % chunks) * nkb  # first KV block of the chunk
    lse2 = lse_ref[...][:, None] * LOG2E  # [R, 1]; +inf for rows that must not count
    live = lse2 < jnp.inf

    def weight(col, n):
        # The factor from a KV block's running maximum to the row's softmax: exp2(top - lse).
        return jnp.where(live, jnp.exp2(top_ref[:, pl.ds(col, n)] - lse2), 0.0)  # [R, n]

    # Column kb + 1 + x holds KV block kb + x; column kb + x the block before it.
    own = part_ref[...].reshape(R, nkb, nbk) * weight(kb + 1, nkb)[:, :, None]
    spill = tail_ref[:, pl.ds(kb, nkb)] * weight(kb, nkb)  # [R, nkb]
    first = lax.broadcasted_iota(jnp.int32, (1, 1, nbk), 2) == 0
    blocks = own + jnp.where(first, spill[:, :, None], 0.0)  # [R, nkb, nbk]
    mass_ref[...] = blocks.reshape(R // group, group, width).sum(axis=1)  # [Q, width]
    # The spill past the chunk's last KV block; only the last chunk's is not counted by another.
    past = tail_ref[:, pl.ds(kb + nkb, 1)] * weight(kb + nkb, 1)  # [R, 1]
    edge_ref[...] = past.reshape(R // group, group, 1).sum(axis=1)  # [Q, 1]


def scored_block_mass(sums, lse, *, interpret: bool = False):
    """Each query's compressed mass on each selection block, from a scored forward's
    `BlockSums` (part, tail, top).

    Args:
      sums: (part, tail, top), each float32 [B, H, T_p, G_p, width], from
        `flash_forward(block_sums=...)`.
      lse: float32 [B, T, H * G], the compressed branch's log-sum-exp.

    Returns:
      float32 [B, H, T_p, part's width + 1]: the mass each query (summed over its G heads) puts
      on each selection block; the last block takes only the spill of the tokens before it.
    """
    part, tail, top = sums
    B, H, T_p, G_p, width = part.shape
    n_alloc = top.shape[-1] - 1
    if n_alloc == 0 or lse.shape[1] == 0:
        return jnp.zeros((B, H, T_p, width + 1), jnp.float32)
    nbk = width // n_alloc
    q_per = min(T_p & -T_p, max(1, 16 // G_p))  # queries per program: 16 rows when possible
    R = q_per * G_p
    # Whole KV blocks (n_alloc is a multiple of SUMS_UNIT), about 2048 sums a program.
    nkb = max(1, min(SUMS_UNIT, 2048 // (R * nbk)))
    nkb = min(nkb & -nkb, n_alloc & -n_alloc)
    chunks = n_alloc // nkb
    grid = (B, H, (T_p // q_per) * chunks)
    rows = lambda w: pl.BlockSpec((None, None, R, w), lambda b, h, i: (b, h, i // chunks, 0))
    out = lambda w: pl.BlockSpec((None, None, q_per, w), lambda b, h, i: (b, h, i // chunks,
                                                                          i % chunks))
    mass, edge = pl.pallas_call(
        functools.partial(_block_mass_kernel, group=G_p, nkb=nkb, chunks=chunks),
        grid=grid,
        in_specs=(pl.BlockSpec((None, None, R), lambda b, h, i: (b, h, i // chunks)),
                  pl.BlockSpec((None, None, R, nkb * nbk),
                               lambda b, h, i: (b, h, i // chunks, i % chunks)),
                  rows(n_alloc + 1), rows(n_alloc + 1)),
        out_specs=(out(nkb * nbk), out(1)),
        out_shape=(jax.ShapeDtypeStruct((B, H, T_p, width), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, T_p, chunks), jnp.float32)),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="nsa_scored_block_mass",
    )(group_lse(lse, H, T_p, G_p),
      *(x.reshape(B, H, T_p * G_p, x.shape[-1]) for x in (part, tail, top)))
    return jnp.concatenate([mass, edge[..., -1:]], axis=-1)
