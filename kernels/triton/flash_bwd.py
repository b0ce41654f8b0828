"""Backward of the grouped flash core (Pallas, Triton lowering): dQ, and dK/dV without atomics.

Both kernels recompute probabilities from the forward's log-sum-exp, so the forward saves only
O(T) residuals (output, lse, compact metadata). Rows are grouped as in `flash_fwd` (queries x the
G heads of one KV head).

- dQ: a program owns one query tile and walks the same KV blocks as the forward.
- dK/dV: a program owns one KV block and walks the query tiles that see it: a contiguous range for
  the range branches (compressed, window), the reverse map's list for the selected branch. Every
  dK/dV element is written by one program, so two runs give bit-identical gradients. Because a
  tile's rows hold all G heads of the KV head, ``ds^T q`` and ``p^T do`` sum over the group.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax.kernels.triton.flash_fwd import (LOG2E, FlashConfig, MaskRule, bound_rows, group_rows,
                                       heads_major, pow2, split_bounds, table_inputs, visible,
                                       walk_range)


# Range walks (compressed branch) are split until about this many programs run.
TARGET_PROGRAMS = 512
MAX_SPLITS = 32
# Block-list walks: the most-selected blocks per (batch, KV head) and the shares each is cut into.
HEAVY_BLOCKS = 8
HEAVY_SPLITS = 16


def query_range(rule: MaskRule, k_start, block_k: int, offset, block_q: int, n_qt: int):
    """[ilo, ihi): the query tiles (of ``block_q`` queries, query 0 at key position ``offset``)
    with some query that sees a key of the block starting at key index ``k_start``."""
    j_hi = jnp.minimum(k_start + block_k, rule.num_keys) - 1
    kp_lo = k_start * rule.key_stride + rule.key_offset
    kp_hi = j_hi * rule.key_stride + rule.key_offset
    w = rule.window
    if rule.causal:
        p_lo, p_hi = kp_lo, (kp_hi + w - 1 if w else None)
    else:
        p_lo, p_hi = (kp_lo - w + 1, kp_hi + w - 1) if w else (None, None)
    ilo = jnp.int32(0) if p_lo is None else jnp.clip((p_lo - offset) // block_q, 0, n_qt)
    ihi = jnp.int32(n_qt) if p_hi is None else jnp.clip((p_hi - offset) // block_q + 1, 0, n_qt)
    return ilo, jnp.where(j_hi < k_start, ilo, jnp.maximum(ihi, ilo))


def _probs(q, k, lse2, q_pos, start, *, rule, scale2, prec, block_k, masked=True, bounds=None):
    s = pltriton.dot(q, k, trans_b=True, precision=prec).astype(jnp.float32) * scale2  # [rows, BK]
    p = jnp.exp2(s - lse2[:, None])
    if masked:
        p = jnp.where(visible(rule, q_pos, start, block_k, bounds), p, 0.0)
    return p


def bounded_query_tiles(bounds, block_k: int, n_kb: int, block_q: int):
    """Packed rows: (ilo, ihi) int32 [B, n_kb], the query tiles with a row whose bounds (lo, hi)
    [B, T] (non-decreasing) meet each KV block."""
    lo, hi = bounds
    j0 = jnp.arange(n_kb, dtype=jnp.int32) * block_k
    first = jax.vmap(lambda h: jnp.searchsorted(h, j0, side="right"))(hi)  # first row with hi > j0
    end = jax.vmap(lambda l: jnp.searchsorted(l, j0 + block_k, side="left"))(lo)  # lo >= j1
    ilo = (first // block_q).astype(jnp.int32)
    return ilo, jnp.maximum(-(-end // block_q), ilo).astype(jnp.int32)


def _dq_kernel(*refs, rule: MaskRule, scale: float, G: int, block_q: int, block_k: int,
               use_table: bool, bounded: bool):
    refs, bounds = split_bounds(refs, bounded, 1)
    if use_table:
        off_ref, tab_ref, cnt_ref, q_ref, do_ref, lse_ref, dl_ref, k_ref, v_ref, dq_ref = refs
    else:
        off_ref, q_ref, do_ref, lse_ref, dl_ref, k_ref, v_ref, dq_ref = refs
    b, i = pl.program_id(0), pl.program_id(2)
    rows = q_ref.shape[0]
    q, do = q_ref[...], do_ref[...]  # [rows, D], [rows, Dv]
    lse2, delta = lse_ref[...] * LOG2E, dl_ref[...]  # [rows]
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    first = off_ref[b] + i * block_q
    q_pos = first + lax.broadcasted_iota(jnp.int32, (rows,), 0) // G

    def visit(blk, dq, masked=True):
        start = pl.multiple_of(blk * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]  # [BK, D]
        v = v_ref[pl.ds(start, block_k), :]  # [BK, Dv]
        p = _probs(q, k, lse2, q_pos, start, rule=rule, scale2=scale * LOG2E, prec=prec,
                   block_k=block_k, masked=masked, bounds=bounds)
        dp = pltriton.dot(do, v, trans_b=True, precision=prec).astype(jnp.float32)  # [rows, BK]
        ds = p * (dp - delta[:, None])
        return dq + pltriton.dot(ds.astype(k.dtype), k, precision=prec).astype(jnp.float32)

    dq = jnp.zeros(q.shape, jnp.float32)
    if use_table:
        dq = lax.fori_loop(0, cnt_ref[0], lambda e, dq: visit(tab_ref[e], dq), dq)
    else:
        dq = walk_range(rule, first, first + block_q - 1, block_k, visit, dq, bounds)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, rule: MaskRule, scale: float, G: int, block_q: int, block_k: int,
                n_qt: int, table_per: int, mode: str, splits: int, bounded: bool):
    """dK/dV of one KV block from one share of the query tiles that see it.

    ``mode`` "range": program p is block p // splits and share p % splits of its query range.
    "table": program p is block p, all its reverse-map entries, unless the block is heavy.
    "heavy": program p is heavy slot p // splits and share p % splits of that block's entries.
    With ``bounded`` the inputs end with the rows' bounds (lo, hi) and, in "range" mode, each
    block's query tile range (ilo, ihi) from `bounded_query_tiles`.
    """
    n_extra = (4 if mode == "range" else 2) if bounded else 0
    if n_extra:
        cut = len(refs) - 2
        bound_refs = refs[cut - n_extra:cut]
        refs = refs[:cut - n_extra] + refs[cut:]
    if mode == "range":
        off_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref = refs
    elif mode == "table":
        off_ref, rt_ref, ro_ref, hv_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref = refs
    else:
        off_ref, rt_ref, ro_ref, hid_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref = refs
    b, h, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if mode == "table":
        j = p
    elif mode == "range":
        j = p // splits
    else:
        j = hid_ref[b, h, p // splits]
    start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]  # [BK, D]
    v = v_ref[pl.ds(start, block_k), :]  # [BK, Dv]
    rows = block_q * G
    prec = lax.Precision.HIGHEST if k.dtype == jnp.float32 else None
    offset = off_ref[b]

    def visit(i, carry):
        dk, dv = carry  # [BK, D], [BK, Dv] float32
        r0 = pl.multiple_of(i * rows, rows)
        q = q_ref[pl.ds(r0, rows), :]  # [rows, D]
        do = do_ref[pl.ds(r0, rows), :]  # [rows, Dv]
        lse2 = lse_ref[pl.ds(r0, rows)] * LOG2E
        delta = dl_ref[pl.ds(r0, rows)]
        q_pos = offset + i * block_q + lax.broadcasted_iota(jnp.int32, (rows,), 0) // G
        bounds = None
        if bounded:
            bounds = (bound_refs[0][pl.ds(r0, rows)], bound_refs[1][pl.ds(r0, rows)])
        p = _probs(q, k, lse2, q_pos, start, rule=rule, scale2=scale * LOG2E, prec=prec,
                   block_k=block_k, bounds=bounds)  # [rows, BK]
        dv = dv + pltriton.dot(p.astype(do.dtype), do, trans_a=True, precision=prec).astype(jnp.float32)
        dp = pltriton.dot(do, v, trans_b=True, precision=prec).astype(jnp.float32)  # [rows, BK]
        ds = p * (dp - delta[:, None])
        dk = dk + pltriton.dot(ds.astype(q.dtype), q, trans_a=True, precision=prec).astype(jnp.float32)
        return dk, dv

    def share(lo, hi, part):  # [lo, hi) cut into `splits` near-equal consecutive shares
        size = (hi - lo + splits - 1) // splits
        a = jnp.minimum(lo + part * size, hi)
        return a, jnp.minimum(a + size, hi)

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if mode == "range":
        ilo, ihi = query_range(rule, start, block_k, offset, block_q, n_qt)
        if bounded:
            ilo = jnp.maximum(ilo, bound_refs[2][b, j])
            ihi = jnp.maximum(jnp.minimum(ihi, bound_refs[3][b, j]), ilo)
        dk, dv = lax.fori_loop(*share(ilo, ihi, p % splits), visit, carry)
    else:
        def entry(e, carry):
            tile = rt_ref[b, h, e]
            return lax.fori_loop(tile * table_per, (tile + 1) * table_per, visit, carry)
        lo, hi = ro_ref[b, h, j], ro_ref[b, h, j + 1]
        if mode == "table":
            hi = jnp.where(hv_ref[b, h, j] > 0, lo, hi)
        else:
            lo, hi = share(lo, hi, p % splits)
        dk, dv = lax.fori_loop(lo, hi, entry, carry)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_backward(q, k, v, o, lse, do, dlse, offsets, *, rule: MaskRule, scale: float,
                   config: FlashConfig, table=None, counts=None, table_q_tile: int = 1,
                   reverse_tiles=None, reverse_offsets=None, bounds=None, interpret: bool = False):
    """Gradients of `flash_forward`'s (o, lse) with respect to q, k and v.

    Args:
      q, k, v, offsets, rule, scale, table, counts, table_q_tile: as given to `flash_forward`.
      o, lse: its outputs. do: cotangent of o [B, T, HQ, Dv]; dlse: of lse [B, T, HQ] (or None).
      config: tiling of both kernels; ``block_k`` must be the block the table and reverse map
        refer to.
      bounds: as given to `flash_forward`.
      reverse_tiles, reverse_offsets: with a table, `metadata.reverse_map` of it (query tiles of
        ``table_q_tile`` queries per KV block of ``config.block_k`` keys).

    Returns:
      dq [B, T, HQ, D], dk [B, N, H, D], dv [B, N, H, Dv] in the dtypes of q, k, v.
    """
    B, T, HQ, D = q.shape
    N, H, Dv = k.shape[1], k.shape[2], v.shape[3]
    if N == 0 or T == 0:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
    G = HQ // H
    bq, bk = config.block_q, config.block_k
    G_p, D_p, Dv_p = pow2(G), max(16, pow2(D)), max(16, pow2(Dv))
    use_table = table is not None
    if use_table and table_q_tile % bq:
        raise ValueError(f"table query tile {table_q_tile} must be a multiple of block_q={bq}")
    if bq * G_p < 16:  # tl.dot needs at least 16 rows: pad the group with zero heads
        G_p = 16 // bq
    rows = bq * G_p
    # With a table, whole selection tiles (the reverse map's unit) must exist as query rows.
    unit = table_q_tile if use_table else bq
    T_p = -(-T // unit) * unit
    n_qt = T_p // bq
    n_kb = -(-N // bk)
    f32 = jnp.float32
    delta = jnp.sum(o.astype(f32) * do.astype(f32), axis=-1)  # [B, T, HQ]
    if dlse is not None:  # d lse / d s = p, so it folds into delta
        delta = delta - dlse.astype(f32)
    # Rows without a visible key (lse = -inf) and padded rows get lse = +inf: probabilities 0.
    lse = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    qg = group_rows(q, H, T_p, G_p, D_p)
    dog = group_rows(do, H, T_p, G_p, Dv_p)
    lse_g = group_rows(lse[..., None], H, T_p, G_p, 1)[..., 0]
    row = jnp.arange(T_p * G_p)
    lse_g = jnp.where(((row // G_p) < T) & ((row % G_p) < G), lse_g, jnp.inf)
    dl_g = group_rows(delta[..., None], H, T_p, G_p, 1)[..., 0]
    kh, vh = heads_major(k, n_kb * bk, D_p), heads_major(v, n_kb * bk, Dv_p)
    params = pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    offsets = offsets.astype(jnp.int32)

    tile_specs = [pl.BlockSpec((None, None, rows, D_p), lambda b, h, i: (b, h, i, 0)),
                  pl.BlockSpec((None, None, rows, Dv_p), lambda b, h, i: (b, h, i, 0)),
                  pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, i)),
                  pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, i))]
    whole_kv = [pl.BlockSpec((None, None, n_kb * bk, D_p), lambda b, h, i: (b, h, 0, 0)),
                pl.BlockSpec((None, None, n_kb * bk, Dv_p), lambda b, h, i: (b, h, 0, 0))]
    dq_specs = tile_specs + whole_kv
    dq_args = [qg, dog, lse_g, dl_g, kh, vh]
    if use_table:
        specs, table_args = table_inputs(table, counts, table_q_tile // bq)
        dq_specs, dq_args = specs + dq_specs, table_args + dq_args
    bounded = bounds is not None
    if bounded:
        rows_lo, rows_hi = bound_rows(bounds, T_p, G_p)
        dq_specs = dq_specs + [pl.BlockSpec((None, rows), lambda b, h, i: (b, i))] * 2
        dq_args = dq_args + [rows_lo, rows_hi]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, rule=rule, scale=scale, G=G_p, block_q=bq, block_k=bk,
                          use_table=use_table, bounded=bounded),
        grid=(B, H, n_qt),
        in_specs=[pl.BlockSpec()] + dq_specs,
        out_specs=pl.BlockSpec((None, None, rows, D_p), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, n_qt * rows, D_p), q.dtype),
        compiler_params=params, interpret=interpret, name="nsa_flash_bwd_dq",
    )(offsets, *dq_args)

    whole_q = [pl.BlockSpec((None, None, n_qt * rows, D_p), lambda b, h, p: (b, h, 0, 0)),
               pl.BlockSpec((None, None, n_qt * rows, Dv_p), lambda b, h, p: (b, h, 0, 0)),
               pl.BlockSpec((None, None, n_qt * rows), lambda b, h, p: (b, h, 0)),
               pl.BlockSpec((None, None, n_qt * rows), lambda b, h, p: (b, h, 0))]
    kv_q_specs, kv_q_args = whole_kv + whole_q, [kh, vh, qg, dog, lse_g, dl_g]
    if bounded:
        whole_rows = pl.BlockSpec((None, n_qt * rows), lambda b, h, p: (b, 0))
        kv_q_specs, kv_q_args = kv_q_specs + [whole_rows] * 2, kv_q_args + [rows_lo, rows_hi]

    def dkv_call(mode: str, programs: int, splits: int, extra_specs, extra_args, out_block, out_index,
                 out_lead):
        specs, args = kv_q_specs, kv_q_args
        if bounded and mode == "range":
            specs = specs + [pl.BlockSpec(), pl.BlockSpec()]
            args = args + list(bounded_query_tiles(bounds, bk, n_kb, bq))
        return pl.pallas_call(
            functools.partial(_dkv_kernel, rule=rule, scale=scale, G=G_p, block_q=bq, block_k=bk,
                              n_qt=n_qt, table_per=table_q_tile // bq, mode=mode, splits=splits,
                              bounded=bounded),
            grid=(B, H, programs),
            in_specs=[pl.BlockSpec()] + extra_specs + specs,
            out_specs=[pl.BlockSpec((None, None, *out_block, bk, D_p), out_index),
                       pl.BlockSpec((None, None, *out_block, bk, Dv_p), out_index)],
            out_shape=[jax.ShapeDtypeStruct((B, H, *out_lead, D_p), jnp.float32),
                       jax.ShapeDtypeStruct((B, H, *out_lead, Dv_p), jnp.float32)],
            compiler_params=params, interpret=interpret, name="nsa_flash_bwd_dkv",
        )(offsets, *extra_args, *args)

    if not use_table:
        # Few KV blocks (compressed tokens) each seen by many query tiles: split every block's
        # query range into `splits` shares, one program each, and add the shares in XLA.
        splits = int(min(MAX_SPLITS, max(1, -(-TARGET_PROGRAMS // (B * H * n_kb)))))
        dk, dv = dkv_call("range", n_kb * splits, splits, [], [], (None,),
                          lambda b, h, p: (b, h, p % splits, p // splits, 0),
                          (splits, n_kb * bk))
        dk, dv = dk.sum(axis=2), dv.sum(axis=2)
    else:
        # A block selected by most query tiles (the forced initial blocks, or a popular one)
        # would serialise on one program: the `heavy` blocks with the most entries are split
        # into shares instead, and their sums written after the others.
        rt, ro = reverse_tiles.astype(jnp.int32), reverse_offsets.astype(jnp.int32)
        n_heavy = min(HEAVY_BLOCKS, n_kb)
        whole = [pl.BlockSpec(), pl.BlockSpec(), pl.BlockSpec()]
        is_heavy = jnp.zeros((B, H, n_kb), jnp.int32)
        if n_heavy:
            _, heavy = lax.top_k(ro[..., 1:] - ro[..., :-1], n_heavy)  # [B, H, n_heavy]
            at = (jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None], heavy.astype(jnp.int32))
            is_heavy = is_heavy.at[at].set(1)
        dk, dv = dkv_call("table", n_kb, 1, whole, [rt, ro, is_heavy], (),
                          lambda b, h, p: (b, h, p, 0), (n_kb * bk,))
        if n_heavy:
            hk, hv = dkv_call("heavy", n_heavy * HEAVY_SPLITS, HEAVY_SPLITS, whole, [rt, ro, at[2]],
                              (None, None),
                              lambda b, h, p: (b, h, p // HEAVY_SPLITS, p % HEAVY_SPLITS, 0, 0),
                              (n_heavy, HEAVY_SPLITS, bk))
            dk = dk.reshape(B, H, n_kb, bk, D_p).at[at].set(hk.sum(axis=3)).reshape(dk.shape)
            dv = dv.reshape(B, H, n_kb, bk, Dv_p).at[at].set(hv.sum(axis=3)).reshape(dv.shape)

    dq = dq.reshape(B, H, T_p, G_p, D_p)[:, :, :T, :G, :D].transpose(0, 2, 1, 3, 4)
    dk = dk[:, :, :N, :D].transpose(0, 2, 1, 3)
    dv = dv[:, :, :N, :Dv].transpose(0, 2, 1, 3)
    return dq.reshape(B, T, HQ, D), dk.astype(k.dtype), dv.astype(v.dtype)
