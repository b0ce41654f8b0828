"""Backward of the grouped flash core (Triton lowering): dQ, and dK/dV without atomics.

Both kernels recompute probabilities from the forward's log-sum-exp, so the forward saves only
O(T) residuals (output, lse, compact metadata). Rows are laid out as in the forward
(`common.Launch`: queries x the G heads of one KV head).

- dQ: a program owns one query tile and walks the same KV blocks as the forward.
- dK/dV: a program owns one KV block (or a share of one) and adds up the query tiles that see it
  (`_dkv_block`); one kernel per way of choosing those tiles: a contiguous range for the range
  branches (compressed, window), the reverse map's list for the selected branch, and a share of
  that list for its most-selected blocks. Every dK/dV element is written by one program, so two
  runs give bit-identical gradients. Because a tile's rows hold all G heads of the KV head,
  ``ds^T q`` and ``p^T do`` sum over the group.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax.kernels.common import (LOG2E, BlockTable, Launch, MaskRule, Program, ReverseTable,
                                    bounded_query_tiles, query_range, read_bounds, table_inputs)
from nsa_jax.kernels.triton.flash_fwd import FlashConfig, dot_precision, scores

# Range walks (compressed branch) are split until about this many programs run.
TARGET_PROGRAMS = 512
MAX_SPLITS = 32
# Block-list walks: the most-selected blocks per (batch, KV head) and the shares each is cut into.
HEAVY_BLOCKS = 8
HEAVY_SPLITS = 16


def probabilities(prog: Program, q, k, lse2, q_pos, start, *, prec, masked=True, bounds=None):
    """float32 [rows, BK]: the forward's probabilities of rows q against the KV block k starting
    at key ``start``, from their log-sum-exp ``lse2`` in log2 units (+inf: all 0)."""
    p = jnp.exp2(scores(prog, q, k, prec) - lse2[:, None])
    if masked:
        p = jnp.where(prog.visible(q_pos, start, bounds), p, 0.0)
    return p


def backward_rows(lay: Launch, q, o, lse, do, dlse):
    """The per-row inputs of a backward kernel in ``lay``'s grouped layout: q, dO, lse (+inf
    where a row sees no key) and delta = rowsum(o * dO) - dlse."""
    f32 = jnp.float32
    delta = jnp.sum(o.astype(f32) * do.astype(f32), axis=-1)  # [B, T, HQ]
    if dlse is not None:  # d lse / d s = p, so it folds into delta
        delta = delta - dlse.astype(f32)
    return (lay.group(q, lay.D_p), lay.group(do, lay.Dv_p), lay.group_lse(lse),
            lay.group_vector(delta))


def _dq_kernel(off_ref, rows, kv, blocks, bounds, dq_ref, *, prog: Program):
    q_ref, do_ref, lse_ref, dl_ref = rows
    k_ref, v_ref = kv
    b, i = pl.program_id(0), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]  # [rows, D], [rows, Dv]
    lse2, delta = lse_ref[...] * LOG2E, dl_ref[...]  # [rows]
    prec = dot_precision(q.dtype)
    first = off_ref[b] + i * prog.block_q
    q_pos = prog.q_pos(first)
    bounds = read_bounds(bounds)
    bk = prog.block_k

    def visit(blk, dq, masked=True):
        start = prog.start(blk)
        k = k_ref[pl.ds(start, bk), :]  # [BK, D]
        v = v_ref[pl.ds(start, bk), :]  # [BK, Dv]
        p = probabilities(prog, q, k, lse2, q_pos, start, prec=prec, masked=masked, bounds=bounds)
        dp = pltriton.dot(do, v, trans_b=True, precision=prec).astype(jnp.float32)  # [rows, BK]
        ds = p * (dp - delta[:, None])
        return dq + pltriton.dot(ds.astype(k.dtype), k, precision=prec).astype(jnp.float32)

    dq = prog.walk(first, visit, jnp.zeros(q.shape, jnp.float32), blocks=blocks, bounds=bounds)
    dq_ref[...] = (dq * prog.scale).astype(dq_ref.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _DkvConfig:
    """Static config of a dK/dV kernel.

    Attributes:
      prog: the program's rule, scale and tile.
      splits: shares each KV block's query tiles are cut into, one program each.
      per: query tiles per reverse-map entry (table row).
    """

    prog: Program
    splits: int = 1
    per: int = 1


def _dkv_block(prog: Program, j, off_ref, kv, rows, bounds, outs, walk):
    """Writes dK (times the scale) and dV of KV block j, summed over the query tiles i that
    ``walk(visit, carry)`` visits; ``rows`` and ``bounds`` hold every row of the (batch, KV head)."""
    k_ref, v_ref = kv
    q_ref, do_ref, lse_ref, dl_ref = rows
    dk_ref, dv_ref = outs
    bk, n = prog.block_k, prog.rows
    start = prog.start(j)
    k = k_ref[pl.ds(start, bk), :]  # [BK, D]
    v = v_ref[pl.ds(start, bk), :]  # [BK, Dv]
    prec = dot_precision(k.dtype)
    offset = off_ref[pl.program_id(0)]

    def visit(i, carry):
        dk, dv = carry  # [BK, D], [BK, Dv] float32
        tile = pl.ds(pl.multiple_of(i * n, n), n)
        q = q_ref[tile, :]  # [rows, D]
        do = do_ref[tile, :]  # [rows, Dv]
        lse2 = lse_ref[tile] * LOG2E
        delta = dl_ref[tile]
        q_pos = prog.q_pos(offset + i * prog.block_q)
        tile_bounds = None if bounds is None else (bounds[0][tile], bounds[1][tile])
        p = probabilities(prog, q, k, lse2, q_pos, start, prec=prec,
                          bounds=tile_bounds)  # [rows, BK]
        pdo = pltriton.dot(p.astype(do.dtype), do, trans_a=True, precision=prec)  # [BK, Dv]
        dv = dv + pdo.astype(jnp.float32)
        dp = pltriton.dot(do, v, trans_b=True, precision=prec).astype(jnp.float32)  # [rows, BK]
        ds = p * (dp - delta[:, None])
        dsq = pltriton.dot(ds.astype(q.dtype), q, trans_a=True, precision=prec)  # [BK, D]
        dk = dk + dsq.astype(jnp.float32)
        return dk, dv

    dk, dv = walk(visit, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
    dk_ref[...] = (dk * prog.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _share(lo, hi, part, splits: int):
    """Share ``part`` of [lo, hi) cut into ``splits`` near-equal consecutive shares."""
    size = (hi - lo + splits - 1) // splits
    a = jnp.minimum(lo + part * size, hi)
    return a, jnp.minimum(a + size, hi)


def _walk_entries(cfg: _DkvConfig, tiles_ref, lo, hi, visit, carry):
    """Visits the query tiles of reverse-map entries lo..hi - 1 of (b, h)."""
    b, h = pl.program_id(0), pl.program_id(1)

    def entry(e, carry):
        row = tiles_ref[b, h, e]
        return lax.fori_loop(row * cfg.per, (row + 1) * cfg.per, visit, carry)

    return lax.fori_loop(lo, hi, entry, carry)


def _dkv_range_kernel(off_ref, tile_ranges, kv, rows, bounds, dk_ref, dv_ref, *, cfg: _DkvConfig):
    """Program p: KV block p // splits, share p % splits of the query tiles its rule lets see it,
    narrowed to packed rows' ``tile_ranges`` = (ilo, ihi) [B, n_kb] refs when given."""
    prog = cfg.prog
    b, p = pl.program_id(0), pl.program_id(2)
    j = p // cfg.splits

    def walk(visit, carry):
        ilo, ihi = query_range(prog.rule, prog.start(j), prog.block_k, off_ref[b], prog.block_q,
                               prog.num_q_tiles)
        if tile_ranges is not None:
            ilo = jnp.maximum(ilo, tile_ranges[0][b, j])
            ihi = jnp.maximum(jnp.minimum(ihi, tile_ranges[1][b, j]), ilo)
        return lax.fori_loop(*_share(ilo, ihi, p % cfg.splits, cfg.splits), visit, carry)

    _dkv_block(prog, j, off_ref, kv, rows, bounds, (dk_ref, dv_ref), walk)


def _dkv_list_kernel(off_ref, walk_refs, kv, rows, bounds, dk_ref, dv_ref, *, cfg: _DkvConfig):
    """Program p: KV block p, all its reverse-map entries, unless the block is heavy (then
    `_dkv_heavy_kernel` covers it)."""
    tiles_ref, offsets_ref, heavy_ref = walk_refs
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def walk(visit, carry):
        lo, hi = offsets_ref[b, h, j], offsets_ref[b, h, j + 1]
        hi = jnp.where(heavy_ref[b, h, j] > 0, lo, hi)
        return _walk_entries(cfg, tiles_ref, lo, hi, visit, carry)

    _dkv_block(cfg.prog, j, off_ref, kv, rows, bounds, (dk_ref, dv_ref), walk)


def _dkv_heavy_kernel(off_ref, walk_refs, kv, rows, bounds, dk_ref, dv_ref, *, cfg: _DkvConfig):
    """Program p: heavy block ``ids[p // splits]``, share p % splits of its reverse-map entries."""
    tiles_ref, offsets_ref, ids_ref = walk_refs
    b, h, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    j = ids_ref[b, h, p // cfg.splits]

    def walk(visit, carry):
        lo, hi = _share(offsets_ref[b, h, j], offsets_ref[b, h, j + 1], p % cfg.splits, cfg.splits)
        return _walk_entries(cfg, tiles_ref, lo, hi, visit, carry)

    _dkv_block(cfg.prog, j, off_ref, kv, rows, bounds, (dk_ref, dv_ref), walk)


def flash_backward(q, k, v, o, lse, do, dlse, offsets, *, rule: MaskRule, scale: float,
                   config: FlashConfig, blocks: BlockTable | None = None,
                   reverse: ReverseTable | None = None, bounds=None, interpret: bool = False,
                   with_dq: bool = True, with_dkv: bool = True):
    """Gradients of `flash_forward`'s (o, lse) with respect to q, k and v.

    Args:
      q, k, v, offsets, rule, scale, blocks, bounds: as given to `flash_forward`.
      o, lse: its outputs. do: cotangent of o [B, T, HQ, Dv]; dlse: of lse [B, T, HQ] (or None).
      config: tiling of both kernels; ``block_k`` must be the block ``blocks`` and ``reverse``
        refer to.
      reverse: with ``blocks``, `metadata.reverse_map` of it (its rows per KV block of
        ``config.block_k`` keys).
      with_dq, with_dkv: False skips the dQ or the dK/dV kernel (another kernel computes those
        gradients) and returns None for them.

    Returns:
      dq [B, T, HQ, D], dk [B, N, H, D], dv [B, N, H, Dv] in the dtypes of q, k, v.
    """
    T, N = q.shape[1], k.shape[1]
    if N == 0 or T == 0:
        zeros = lambda x, wanted: jnp.zeros_like(x) if wanted else None
        return zeros(q, with_dq), zeros(k, with_dkv), zeros(v, with_dkv)
    if (blocks is None) != (reverse is None):
        raise ValueError("flash_backward takes `reverse` exactly when it takes `blocks`")
    bq, bk = config.block_q, config.block_k
    # With a table, whole selection tiles (the reverse map's unit) must exist as query rows.
    per = None if blocks is None else blocks.tiles_per_row(bq)
    lay = Launch.of(q, k, v, block_q=bq, block_k=bk,
                    q_unit=None if blocks is None else blocks.q_tile)
    prog = lay.program(rule, scale)
    B, H, n_kb = lay.B, lay.H, lay.num_kv_blocks
    f32 = jnp.float32
    rows = backward_rows(lay, q, o, lse, do, dlse)
    kv = (lay.heads_major(k, lay.D_p), lay.heads_major(v, lay.Dv_p))
    kv_specs = (lay.kv_spec(lay.D_p), lay.kv_spec(lay.Dv_p))
    offsets = offsets.astype(jnp.int32)

    table_specs, table_args = table_inputs(blocks, bq)
    bound_specs, bound_args = lay.bound_inputs(bounds)
    dq = None if not with_dq else pl.pallas_call(
        functools.partial(_dq_kernel, prog=prog),
        grid=(B, H, lay.num_q_tiles),
        in_specs=(pl.BlockSpec(),
                  (lay.tile_spec(lay.D_p), lay.tile_spec(lay.Dv_p), lay.tile_spec(),
                   lay.tile_spec()),
                  kv_specs, table_specs, bound_specs),
        out_specs=lay.tile_spec(lay.D_p),
        out_shape=lay.rows_shape(q.dtype, lay.D_p),
        compiler_params=config.compiler_params(), interpret=interpret, name="nsa_flash_bwd_dq",
    )(offsets, rows, kv, table_args, bound_args)

    rows_specs = (lay.all_rows_spec(lay.D_p), lay.all_rows_spec(lay.Dv_p), lay.all_rows_spec(),
                  lay.all_rows_spec())
    all_bound_specs, all_bound_args = lay.bound_inputs(bounds, all_rows=True)

    def dkv_call(kernel, cfg: _DkvConfig, programs: int, walk_args, out_block, out_index, out_lead):
        return pl.pallas_call(
            functools.partial(kernel, cfg=cfg),
            grid=(B, H, programs),
            in_specs=(pl.BlockSpec(), jax.tree.map(lambda _: pl.BlockSpec(), walk_args), kv_specs,
                      rows_specs, all_bound_specs),
            out_specs=[pl.BlockSpec((None, None, *out_block, bk, lay.D_p), out_index),
                       pl.BlockSpec((None, None, *out_block, bk, lay.Dv_p), out_index)],
            out_shape=[jax.ShapeDtypeStruct((B, H, *out_lead, lay.D_p), f32),
                       jax.ShapeDtypeStruct((B, H, *out_lead, lay.Dv_p), f32)],
            compiler_params=config.compiler_params(), interpret=interpret,
            name="nsa_flash_bwd_dkv",
        )(offsets, walk_args, kv, rows, all_bound_args)

    if not with_dkv:
        dk = dv = None
    elif blocks is None:
        # Few KV blocks (compressed tokens) each seen by many query tiles: split every block's
        # query range into `splits` shares, one program each, and add the shares in XLA.
        splits = int(min(MAX_SPLITS, max(1, -(-TARGET_PROGRAMS // (B * H * n_kb)))))
        tile_ranges = None if bounds is None else bounded_query_tiles(bounds, bk, n_kb, bq)
        dk, dv = dkv_call(_dkv_range_kernel, _DkvConfig(prog=prog, splits=splits),
                          n_kb * splits, tile_ranges, (None,),
                          lambda b, h, p: (b, h, p % splits, p // splits, 0),
                          (splits, lay.N_p))
        dk, dv = dk.sum(axis=2), dv.sum(axis=2)
    else:
        # A block selected by most query tiles (the forced initial blocks, or a popular one)
        # would serialise on one program: the `heavy` blocks with the most entries are split
        # into shares instead, and their sums written after the others.
        rt, ro = reverse.tiles.astype(jnp.int32), reverse.offsets.astype(jnp.int32)
        n_heavy = min(HEAVY_BLOCKS, n_kb)
        is_heavy = jnp.zeros((B, H, n_kb), jnp.int32)
        if n_heavy:
            _, heavy = lax.top_k(ro[..., 1:] - ro[..., :-1], n_heavy)  # [B, H, n_heavy]
            at = (jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None],
                  heavy.astype(jnp.int32))
            is_heavy = is_heavy.at[at].set(1)
        dk, dv = dkv_call(_dkv_list_kernel, _DkvConfig(prog=prog, per=per), n_kb,
                          (rt, ro, is_heavy), (), lambda b, h, p: (b, h, p, 0), (lay.N_p,))
        if n_heavy:
            hk, hv = dkv_call(_dkv_heavy_kernel,
                              _DkvConfig(prog=prog, splits=HEAVY_SPLITS, per=per),
                              n_heavy * HEAVY_SPLITS, (rt, ro, at[2]), (None, None),
                              lambda b, h, p: (b, h, p // HEAVY_SPLITS, p % HEAVY_SPLITS, 0, 0),
                              (n_heavy, HEAVY_SPLITS, bk))
            dk = dk.reshape(B, H, n_kb, bk, lay.D_p).at[at].set(hk.sum(axis=3)).reshape(dk.shape)
            dv = dv.reshape(B, H, n_kb, bk, lay.Dv_p).at[at].set(hv.sum(axis=3)).reshape(dv.shape)

    if dk is not None:
        dk, dv = lay.seq_major(dk, lay.D).astype(k.dtype), lay.seq_major(dv, lay.Dv).astype(v.dtype)
    return None if dq is None else lay.ungroup(dq, lay.D), dk, dv
