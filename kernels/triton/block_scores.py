"""Block scoring's input from the compressed branch (Triton lowering), in two forms.

`compressed_mass`: given the compressed branch's log-sum-exp, a program recomputes the
probabilities of its rows (queries x the G heads of one KV head, as in the forward) against the
compressed tokens and sums them over the rows. Summing over a selection tile's sub-tiles and
mapping compressed tokens onto selection blocks is linear and cheap, so it stays in XLA; no
[T, N_c] array is ever formed.

`scored_block_mass`: a call of few queries (a decode step) has the forward write its scores
instead (`flash_forward(with_scores=True)`), and this kernel turns them into each query's mass on
every selection block, one chunk of whole blocks per program so that thousands run at once.
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


def _block_mass_kernel(lse_ref, s_ref, own_ref, spill_ref, *, group: int, overlap: int):
    lse2 = lse_ref[...][:, None, None] * LOG2E  # [R, 1, 1]; +inf for rows that must not count
    # Rows that do not count may hold anything (padded rows' scores are never read otherwise).
    p = jnp.where(lse2 < jnp.inf, jnp.exp2(s_ref[...] - lse2), 0.0)  # [R, NB, pb]
    R, NB, pb = p.shape
    # Token k of a block covers strides k .. k + r - 1: min(r, pb - k) of them in its own block,
    # the rest in the next one (r - 1 <= pb); each stride carries 1 / r of the token's mass.
    k = lax.broadcasted_iota(jnp.int32, (1, 1, pb), 2)
    own_w = jnp.minimum(overlap, pb - k).astype(jnp.float32) / overlap
    spill_w = jnp.maximum(k + overlap - pb, 0).astype(jnp.float32) / overlap
    by_query = lambda x: jnp.sum(x, axis=2).reshape(R // group, group, NB).sum(axis=1)
    own_ref[...] = by_query(p * own_w)  # [Q, NB]
    spill_ref[...] = by_query(p * spill_w)  # [Q, NB]: mass of block j landing in block j + 1


def scored_block_mass(scores, lse, *, per_block: int, overlap: int, config: FlashConfig,
                      interpret: bool = False):
    """Each query's compressed mass on each selection block, from the forward's scores.

    Args:
      scores: float32 [B, H, T_p, G_p, N_p] from `flash_forward(with_scores=True)` (log2 units,
        -inf where a token is not visible; T, G padded to T_p, G_p).
      lse: float32 [B, T, H * G], the compressed branch's log-sum-exp.
      per_block: compressed strides per selection block (l' / d), a power of two dividing N_p.
      overlap: strides one compressed token covers (r = l / d), at most ``per_block + 1``.
      config: ``block_k`` caps the tokens per program, ``num_warps`` and ``num_stages`` launch it.

    Returns:
      float32 [B, H, T_p, N_p / per_block + 1]: the mass each query (summed over its G heads)
      puts on each block; the last block takes only the spill of the tokens before it.
    """
    B, H, T_p, G_p, N_p = scores.shape
    T, G = lse.shape[1], lse.shape[2] // H
    N_b = N_p // per_block
    if N_p == 0 or T == 0:
        return jnp.zeros((B, H, T_p, N_b + 1), jnp.float32)
    # +inf for rows that must not count (no visible token, padded queries and heads).
    lse_rows = jnp.where(jnp.isfinite(lse), lse, jnp.inf).reshape(B, T, H, G).transpose(0, 2, 1, 3)
    lse_rows = jnp.pad(lse_rows, ((0, 0), (0, 0), (0, T_p - T), (0, G_p - G)),
                       constant_values=jnp.inf).reshape(B, H, T_p * G_p)
    q_per = min(T_p & -T_p, max(1, 16 // G_p))  # queries per program: 16 rows when possible
    R = q_per * G_p
    # Chunks of whole blocks dividing N_p, about 4096 scores a program.
    nb = max(1, min(max(config.block_k, 4096 // R) // per_block, (N_p & -N_p) // per_block))
    grid = (B, H, (T_p // q_per) * (N_b // nb))
    n_c = N_b // nb
    rows = lambda b, h, i: (b, h, i // n_c)
    out = pl.BlockSpec((None, None, q_per, nb), lambda b, h, i: (b, h, i // n_c, i % n_c))
    own, spill = pl.pallas_call(
        functools.partial(_block_mass_kernel, group=G_p, overlap=overlap),
        grid=grid,
        in_specs=(pl.BlockSpec((None, None, R), rows),
                  pl.BlockSpec((None, None, R, nb, per_block),
                               lambda b, h, i: (b, h, i // n_c, i % n_c, 0))),
        out_specs=(out, out),
        out_shape=(jax.ShapeDtypeStruct((B, H, T_p, N_b), jnp.float32),) * 2,
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="nsa_scored_block_mass",
    )(lse_rows, scores.reshape(B, H, T_p * G_p, N_b, per_block))
    edge = [(0, 0)] * 3
    return jnp.pad(own, edge + [(0, 1)]) + jnp.pad(spill, edge + [(1, 0)])
