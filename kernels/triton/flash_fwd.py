"""The grouped flash-attention forward core shared by the three NSA branches (Triton lowering).

A program owns one (batch, KV head, query tile) of `common.Launch`'s row layout, so every KV block
is loaded once for the query heads of its group. It walks either its row of a `BlockTable` or the
contiguous range of blocks its rows can see under the `MaskRule` (and their packed bounds), masks
each score with that rule, and keeps the softmax statistics in float32. The module also holds
`FlashConfig`, the tiling of every Triton kernel here, and the score product the backward and the
block scoring share.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax.kernels.common import (LN2, BlockTable, Launch, MaskRule, Program,
                                    bounded_ranges, check_launch_fields, no_keys, read_bounds,
                                    table_inputs)
from nsa_jax.kernels.triton.block_map import exact_dot, token_map


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlashConfig:
    """Tiling of a Triton kernel; not semantics.

    Attributes:
      block_q: queries per program (power of two); rows per program are block_q * G_p.
      block_k: keys per KV block (power of two, >= 16).
      num_warps, num_stages: Triton launch parameters.
      splits: programs per query tile in the forward, each walking an equal share of the tile's
        KV blocks, merged by log-sum-exp (flash-decoding): calls of few query tiles (a decode
        step) otherwise leave most of the GPU idle.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    splits: int = 1

    def __post_init__(self):
        check_launch_fields(self, {"block_q": 1, "block_k": 16, "num_warps": 1})
        if not isinstance(self.splits, int) or isinstance(self.splits, bool) or self.splits < 1:
            raise ValueError(f"FlashConfig.splits={self.splits!r} must be a positive int")

    def compiler_params(self) -> pltriton.CompilerParams:
        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def dot_precision(dtype):
    # float32 inputs get float32 products; Triton would otherwise use TF32.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def scores(prog: Program, q, k, prec):
    """float32 [rows, BK]: scaled scores of q [rows, D] against k [BK, D], in log2 units."""
    return pltriton.dot(q, k, trans_b=True, precision=prec).astype(jnp.float32) * prog.scale2


# Block sums are allocated for a multiple of this many KV blocks, so that their reader takes
# whole chunks of them.
SUMS_UNIT = 8


@dataclasses.dataclass(frozen=True)
class BlockSums:
    """The selection-block partial sums a scored forward writes (`flash_forward`'s
    ``block_sums``), for compressed tokens of ``per_block`` strides per selection block, each
    token covering ``overlap`` strides. Per row, per KV block visited: ``part``, the block's
    probabilities relative to the running maximum then, mapped onto its selection blocks (float32
    [.., rows, n * BK / per_block]); ``tail``, their share past the KV block's end (in the next
    one's first selection block); ``top``, that running maximum in log2 units (-inf before any
    visible key). ``tail`` and ``top`` [.., rows, n + 1] hold KV block j in column j + 1 and
    nothing (0, -inf) in column 0; n is the KV block count rounded up to `SUMS_UNIT`, and what no
    row sees is 0 (``top`` -inf)."""

    per_block: int
    overlap: int


def _kernel(off_ref, q_ref, k_ref, v_ref, blocks, bounds, o_ref, lse_ref, *sums_refs,
            prog: Program, splits: int, sums: BlockSums | None):
    b, i, share = pl.program_id(0), pl.program_id(2) // splits, pl.program_id(2) % splits
    q = q_ref[...]  # [rows, D]
    prec = dot_precision(q.dtype)
    first = off_ref[b] + i * prog.block_q
    q_pos = prog.q_pos(first)  # [rows]
    bounds = read_bounds(bounds)
    bk = prog.block_k
    rows, Dv = prog.rows, v_ref.shape[-1]
    if sums is not None:
        part_ref, tail_ref, top_ref = sums_refs
        pb = sums.per_block
        to_blocks, past_end = token_map(bk, pb, sums.overlap)  # [BK, BK / pb], [BK]

    def visit(blk, carry, masked=True):
        acc, m, l = carry  # [rows, Dv], [rows], [rows]; m in log2 units
        start = prog.start(blk)
        k = k_ref[pl.ds(start, bk), :]  # [BK, D]
        v = v_ref[pl.ds(start, bk), :]  # [BK, Dv]
        s = scores(prog, q, k, prec)  # [rows, BK]
        if masked:
            s = jnp.where(prog.visible(q_pos, start, bounds), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])  # [rows, BK]
        if sums is not None:
            part_ref[:, pl.ds(blk * (bk // pb), bk // pb)] = exact_dot(p, to_blocks)
            tail_ref[:, pl.ds(blk + 1, 1)] = jnp.sum(p * past_end[None, :], axis=1)[:, None]
            top_ref[:, pl.ds(blk + 1, 1)] = m_new[:, None]
        l = l * alpha + jnp.sum(p, axis=1)
        pv = pltriton.dot(p.astype(v.dtype), v, precision=prec).astype(jnp.float32)  # [rows, Dv]
        acc = acc * alpha[:, None] + pv
        return acc, m_new, l

    init = (jnp.zeros((rows, Dv), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = prog.walk(first, visit, init, blocks=blocks, bounds=bounds,
                          part=None if splits == 1 else (share, splits))
    if sums is not None:
        # The sums start undefined: the KV blocks no share walks hold no visible key. The first
        # share clears those before the range (and column 0), the last those after it.
        n_alloc = top_ref.shape[-1] - 1
        lo, hi = bounded_ranges(prog.rule, first, first + prog.block_q - 1, bk, bounds)[:2]
        lo = jnp.where(share == 0, lo, jnp.int32(0))
        hi = jnp.where(share == splits - 1, hi, jnp.int32(n_alloc))
        nbk = bk // pb

        def clear(blk, carry):
            part_ref[:, pl.ds(blk * nbk, nbk)] = jnp.zeros((rows, nbk), jnp.float32)
            tail_ref[:, pl.ds(blk + 1, 1)] = jnp.zeros((rows, 1), jnp.float32)
            top_ref[:, pl.ds(blk + 1, 1)] = jnp.full((rows, 1), -jnp.inf, jnp.float32)
            return carry

        @pl.when(share == 0)
        def _():
            tail_ref[:, pl.ds(0, 1)] = jnp.zeros((rows, 1), jnp.float32)
            top_ref[:, pl.ds(0, 1)] = jnp.full((rows, 1), -jnp.inf, jnp.float32)

        lax.fori_loop(0, lo, clear, 0)
        lax.fori_loop(hi, n_alloc, clear, 0)
    has_key = l > 0
    l_safe = jnp.where(has_key, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_key, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)


def flash_forward(q, k, v, offsets, *, rule: MaskRule, scale: float, config: FlashConfig,
                  blocks: BlockTable | None = None, bounds=None, interpret: bool = False,
                  block_sums: BlockSums | None = None):
    """Grouped flash attention over a block list or a block range.

    Args:
      q: [B, T, HQ, D]; k: [B, N, H, D]; v: [B, N, H, Dv] (N keys or compressed tokens).
      offsets: int32[B], key position of query 0 (S - T).
      rule: the token-level mask rule.
      scale: softmax scale.
      config: tiling; ``config.block_k`` is the KV block the table ids refer to, and
        ``config.splits`` shares walk each query tile's blocks.
      blocks: optional KV blocks per query tile (``blocks.q_tile`` a multiple of
        ``config.block_q``). Without it each program walks the range of blocks its rule can see.
      bounds: optional (lo, hi) int32 [B, T]: query t sees only keys lo[t] <= j < hi[t] (packed
        rows); both non-decreasing in t.
      block_sums: also write every row's selection-block partial sums (range walks only;
        ``config.block_k / per_block`` a multiple of 16): the selection of a few queries (a
        decode step) then reads them instead of computing the probabilities again.

    Returns:
      o [B, T, HQ, Dv] in q.dtype and lse [B, T, HQ] float32 (-inf for rows without a key);
      with ``block_sums`` also (part, tail, top) as `BlockSums` describes, each
      [B, H, T_p, G_p, width] (the padded sizes of `Launch`).
    """
    if block_sums is not None and blocks is not None:
        raise ValueError("block_sums needs a range walk (blocks=None)")
    splits = config.splits
    lay = Launch.of(q, k, v, block_q=config.block_q, block_k=config.block_k)
    if block_sums is not None:
        nbk = config.block_k // block_sums.per_block
        n_alloc = -(-lay.num_kv_blocks // SUMS_UNIT) * SUMS_UNIT
        sums_shape = lambda w: (lay.B, lay.H, lay.T_p, lay.G_p, w)
        widths = (n_alloc * nbk, n_alloc + 1, n_alloc + 1)
    if k.shape[1] == 0 or q.shape[1] == 0:
        o, lse = no_keys(q, v)
        if block_sums is None:
            return o, lse
        return o, lse, tuple(jnp.full(sums_shape(w), f, jnp.float32)
                             for w, f in zip(widths, (0.0, 0.0, -jnp.inf)))
    table_specs, table_args = table_inputs(blocks, lay.block_q, splits)
    bound_specs, bound_args = lay.bound_inputs(bounds, splits=splits)
    (k_spec, k_in), (v_spec, v_in) = lay.keys(k, lay.D_p), lay.keys(v, lay.Dv_p)
    # Program (b, h, j) owns query tile j // splits and share j % splits of its blocks.
    tile = lambda *width: pl.BlockSpec((None, None, lay.rows, *width),
                                       lambda b, h, j: (b, h, j // splits) + (0,) * len(width))
    if splits == 1:
        out_specs = [tile(lay.Dv_p), tile()]
        out_shape = [lay.rows_shape(q.dtype, lay.Dv_p), lay.rows_shape(jnp.float32)]
    else:
        # Each share's own softmax, in float32 until the merge.
        rows = lay.T_p * lay.G_p
        part = lambda *width: pl.BlockSpec(
            (None, None, None, lay.rows, *width),
            lambda b, h, j: (b, h, j % splits, j // splits) + (0,) * len(width))
        out_specs = [part(lay.Dv_p), part()]
        out_shape = [jax.ShapeDtypeStruct((lay.B, lay.H, splits, rows, lay.Dv_p), jnp.float32),
                     jax.ShapeDtypeStruct((lay.B, lay.H, splits, rows), jnp.float32)]
    if block_sums is not None:
        out_specs += [tile(w) for w in widths]
        out_shape += [lay.rows_shape(jnp.float32, w) for w in widths]
    out = pl.pallas_call(
        functools.partial(_kernel, prog=lay.program(rule, scale), splits=splits,
                          sums=block_sums),
        grid=(lay.B, lay.H, lay.num_q_tiles * splits),
        in_specs=(pl.BlockSpec(), tile(lay.D_p), k_spec, v_spec, table_specs, bound_specs),
        out_specs=tuple(out_specs),
        out_shape=tuple(out_shape),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="nsa_flash_fwd_scored" if block_sums is not None else "nsa_flash_fwd",
    )(offsets.astype(jnp.int32), lay.group(q, lay.D_p), k_in, v_in, table_args, bound_args)
    o, lse = out[:2] if splits == 1 else merge_shares(*out[:2], q.dtype)
    o, lse = lay.ungroup(o, v.shape[3]), lay.ungroup_vector(lse)
    if block_sums is None:
        return o, lse
    return o, lse, tuple(x.reshape(sums_shape(w)) for x, w in zip(out[2:], widths))


def merge_shares(o, lse, dtype):
    """Softmax results [B, H, splits, rows, ...] over disjoint key ranges -> the whole range's
    (o in ``dtype``, lse); rows no share saw keep o = 0, lse = -inf."""
    top = jnp.max(lse, axis=2)  # [B, H, rows]
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp(lse - top[:, :, None])  # [B, H, splits, rows]; 0 for a share that saw nothing
    total = jnp.sum(w, axis=2)
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    o = jnp.sum(w[..., None] * o, axis=2) / total[..., None]
    return o.astype(dtype), jnp.where(seen, top + jnp.log(total), -jnp.inf)
