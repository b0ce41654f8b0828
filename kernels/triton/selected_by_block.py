"""Per-token selected attention walked block by block (Triton lowering).

With ``select_q_tile = 1`` each query attends to its own n blocks. Walking them query by query
(`flash_fwd` with a one-query tile) loads n KV blocks for G rows: at G = 4 a 64-key block serves
4 rows, the matrix units idle and the branch streams K/V at the memory's limit. Here a program
owns one KV block instead, loads it once, and gathers the queries that chose it (the reverse map,
sorted by block) ``block_q`` at a time: ``block_q * G_p`` rows per product whatever G is.

Each (query, chosen block) pair gives a partial softmax: the block's output normalised by its own
sum, and its log-sum-exp. They go to an ``[entries, G_p]`` buffer at the pair's own slot (entry
``t * n + e`` for the e-th id of query t), so every element has one writer and no atomics are
needed. `merge_partials` then combines the n partials of each query by their log-sum-exps, which
is the flash-attention update done once at the end. The traffic is the gathered queries and the
partials, ``O(T * n * HQ * Dv)``, instead of the ``O(T * n * H * BK * (D + Dv))`` of re-loading
blocks per query; the partials are float32, so the result matches the one-pass kernel to float32
rounding.

A block chosen by many queries (the forced first block, by all of them) is cut into work items of
at most ``CHUNKS_PER_PROGRAM * block_q`` entries, one program each, so no program runs long. The
partials take ``T * n * HQ * Dv`` float32 (dQ's: ``* D``), so long inputs run in several launches
of consecutive queries (`PARTIAL_BYTES`); the backward adds their dK/dV in order.

Which wins depends on G, so `nsa_jax.ops.triton` picks per pass (H200, T=65536, bf16): the forward
runs here for G <= 8 (G=4: 19.4 ms against 42.4 query-major) and query-major at G=16 (20.3
against 33.4: sixteen rows per query already use a block well, and 34 GB of partials cost more
than the re-loads); the backward runs here up to G=16 (forward+backward of the branch 61.3 ms
against 70.9 at G=16, 41.4 against 144.2 at G=4).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax import metadata
from nsa_jax.kernels.common import LN2, LOG2E, Launch, MaskRule, Program, no_keys
from nsa_jax.kernels.triton.flash_bwd import backward_rows
from nsa_jax.kernels.triton.flash_fwd import FlashConfig, dot_precision, scores

CHUNKS_PER_PROGRAM = 16
BWD_CHUNKS_PER_PROGRAM = 64
# Longer inputs run in launches of fewer queries, so their partials stay under this many bytes
# (without it: 17 GB forward at T=65536, G=4, n=16 and 34 GB of dQ partials at G=16).
PARTIAL_BYTES = 1 << 32


def block_entries(indices, counts, num_kv_blocks: int):
    """`metadata.entries_by_block` of per-token ids int32 [B, H, T, n] (valid before ``counts``
    [B, H, T]): entry ``t * n + e`` is the e-th id of query t."""
    used = jnp.arange(indices.shape[-1], dtype=jnp.int32) < counts[..., None]
    return metadata.entries_by_block(indices, used, num_kv_blocks)


def work_items(offsets, per_item: int, num_items: int):
    """Cuts each block's entry list into items of at most ``per_item`` entries.

    Returns ((block, lo, hi), (first, pieces)): item w covers entries lo..hi - 1 of block
    ``block`` (int32 [B, H, num_items] each; items past the last have lo = hi, nothing to do);
    block j's items are ``first[j] .. first[j] + pieces[j] - 1`` (int32 [B, H, n_kb]).
    ``num_items`` must be at least ``sum_j ceil(count_j / per_item)``.
    """
    count = offsets[..., 1:] - offsets[..., :-1]  # [B, H, n_kb]
    pieces = (count + per_item - 1) // per_item
    ends = jnp.cumsum(pieces, axis=-1)  # [B, H, n_kb]
    w = jnp.arange(num_items, dtype=jnp.int32)
    search = jax.vmap(jax.vmap(lambda a: jnp.searchsorted(a, w, side="right")))
    n_kb = count.shape[-1]
    blk = jnp.minimum(search(ends), n_kb - 1).astype(jnp.int32)
    at = functools.partial(jnp.take_along_axis, indices=blk, axis=-1)
    first = at(ends - pieces)
    lo = at(offsets[..., :-1]) + (w - first) * per_item
    hi = jnp.minimum(lo + per_item, at(offsets[..., 1:]))
    live = w < ends[..., -1:]
    return ((blk, jnp.where(live, lo, 0), jnp.where(live, hi, 0)),
            ((ends - pieces).astype(jnp.int32), pieces.astype(jnp.int32)))


def _item(prog: Program, work, k_ref, v_ref):
    """This program's work item: (lo, hi) of its entries, its block's first key, and the block's
    K [BK, D] and V [BK, Dv]."""
    blk_ref, lo_ref, hi_ref = work
    w = pl.program_id(2)
    start = prog.start(blk_ref[w])
    bk = prog.block_k
    return lo_ref[w], hi_ref[w], start, k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]


def _chunk_rows(prog: Program, ent_ref, lo, hi, c, slots: int, trash):
    """Rows of chunk ``c`` of entries lo..hi - 1 (row r: entry ``lo + c * block_q + r // G``,
    head ``r % G``), each [rows]: whether it holds an entry, its query, its row in the grouped
    query arrays, and its row in a per-entry buffer (entry ``trash`` when it holds none)."""
    G = prog.group
    r = lax.broadcasted_iota(jnp.int32, (prog.rows,), 0)
    e = lo + c * prog.block_q + r // G
    valid = e < hi
    ent = jnp.where(valid, ent_ref[jnp.where(valid, e, lo)], 0)
    t = ent // slots
    return valid, t, t * G + r % G, jnp.where(valid, ent, trash) * G + r % G


def _num_chunks(prog: Program, lo, hi):
    return (hi - lo + prog.block_q - 1) // prog.block_q


def _kernel(off_ref, work, ent_ref, q_ref, k_ref, v_ref, bounds, o_ref, lse_ref, *,
            prog: Program, slots: int):
    lo, hi, start, k, v = _item(prog, work, k_ref, v_ref)
    prec = dot_precision(k.dtype)
    offset = off_ref[pl.program_id(0)]
    trash = o_ref.shape[0] // prog.group - 1  # the buffer's last entry takes rows without one

    def chunk(c, carry):
        valid, t, q_row, out_row = _chunk_rows(prog, ent_ref, lo, hi, c, slots, trash)
        q = q_ref[q_row, :]  # [rows, D]
        row_bounds = None if bounds is None else (bounds[0][q_row], bounds[1][q_row])
        s = scores(prog, q, k, prec)  # [rows, BK]
        seen = prog.visible(offset + t, start, row_bounds) & valid[:, None]
        s = jnp.where(seen, s, -jnp.inf)
        m = jnp.max(s, axis=1)
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        p = jnp.exp2(s - m_safe[:, None])
        l = jnp.sum(p, axis=1)
        has_key = l > 0
        l_safe = jnp.where(has_key, l, 1.0)
        o = pltriton.dot(p.astype(v.dtype), v, precision=prec).astype(jnp.float32)  # [rows, Dv]
        o_ref[out_row, :] = (o / l_safe[:, None]).astype(o_ref.dtype)
        lse_ref[out_row] = jnp.where(has_key, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
        return carry

    lax.fori_loop(0, _num_chunks(prog, lo, hi), chunk, 0)


def merge_partials(part_o, part_lse, counts, slots: int, G: int, Dv: int):
    """Combines the partial softmaxes of each query's ``slots`` entries (``counts`` [B, H, T] of
    them used): (o float32 [B, H, T, G, Dv], lse float32 [B, H, T, G]; 0 and -inf where a query
    sees no key)."""
    B, H, T = counts.shape
    G_p = part_lse.shape[2] // (T * slots + 1)
    o = part_o[:, :, :T * slots * G_p].reshape(B, H, T, slots, G_p, -1)[..., :G, :Dv]
    lse = part_lse[:, :, :T * slots * G_p].reshape(B, H, T, slots, G_p)[..., :G]
    used = (jnp.arange(slots, dtype=jnp.int32) < counts[..., None])[..., None]  # [B, H, T, n, 1]
    lse = jnp.where(used, lse, -jnp.inf)
    m = jnp.max(lse, axis=3)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    weight = jnp.where(used, jnp.exp(lse - m_safe[:, :, :, None]), 0.0)  # [B, H, T, n, G]
    total = jnp.sum(weight, axis=3)
    o = jnp.sum(weight[..., None] * jnp.where(used[..., None], o, 0.0), axis=3)
    seen = total > 0
    total_safe = jnp.where(seen, total, 1.0)
    return o / total_safe[..., None], jnp.where(seen, m_safe + jnp.log(total_safe), -jnp.inf)


def selected_by_block(q, k, v, offsets, indices, counts, *, rule: MaskRule, scale: float,
                      config: FlashConfig, bounds=None, interpret: bool = False):
    """Per-token selected attention, one program per KV block (or share of one).

    Args:
      q: [B, T, HQ, D]; k: [B, S, H, D]; v: [B, S, H, Dv].
      offsets: int32[B], key position of query 0 (S - T).
      indices, counts: int32 [B, H, T, n] and [B, H, T], each query's KV blocks of
        ``config.block_k`` keys (valid before ``counts``).
      rule: the token-level mask rule (causal or not; no window).
      scale: softmax scale.
      config: ``block_q`` queries gathered per product (rows = block_q * G_p), ``block_k``.
      bounds: optional (lo, hi) int32 [B, T]: query t sees only keys lo[t] <= j < hi[t].

    Returns:
      o [B, T, HQ, Dv] in q.dtype and lse [B, T, HQ] float32 (-inf for rows without a key).
    """
    B, T = q.shape[:2]
    n = indices.shape[-1]
    if k.shape[1] == 0 or T == 0 or n == 0:
        return no_keys(q, v)
    lay = Launch.of(q, k, v, block_q=config.block_q, block_k=config.block_k, q_unit=1)
    parts = [_forward_chunk(q[:, a:b], k, v, offsets + a, indices[:, :, a:b], counts[:, :, a:b],
                            _cut(bounds, a, b), rule, scale, config, interpret)
             for a, b in query_chunks(T, B * n * lay.H * lay.G_p * lay.Dv_p)]
    return tuple(jnp.concatenate(x, axis=1) for x in zip(*parts))


def _cut(bounds, a: int, b: int):
    return None if bounds is None else tuple(x[:, a:b] for x in bounds)


def query_chunks(T: int, per_query: int) -> list[tuple[int, int]]:
    """[a, b) ranges of queries whose float32 partials (``per_query`` elements each) stay under
    `PARTIAL_BYTES`."""
    size = max(1, min(T, PARTIAL_BYTES // (4 * per_query)))
    return [(a, min(T, a + size)) for a in range(0, T, size)]


def _forward_chunk(q, k, v, offsets, indices, counts, bounds, rule, scale, config, interpret):
    B, T, HQ, _ = q.shape
    Dv = v.shape[3]
    n = indices.shape[-1]
    lay = Launch.of(q, k, v, block_q=config.block_q, block_k=config.block_k, q_unit=1)
    prog = lay.program(rule, scale)
    entries, ent_offsets = block_entries(indices, counts, lay.num_kv_blocks)
    per_item = CHUNKS_PER_PROGRAM * config.block_q
    num_items = -(-T * n // per_item) + lay.num_kv_blocks
    work, _ = work_items(ent_offsets, per_item, num_items)
    G_p, E = lay.G_p, T * n
    per_bh = lambda *shape: pl.BlockSpec((None, None, *shape),
                                         lambda b, h, w: (b, h, *(0,) * len(shape)))
    bound_specs, bound_args = lay.bound_inputs(bounds, all_rows=True)
    (k_spec, k_in), (v_spec, v_in) = lay.keys(k, lay.D_p), lay.keys(v, lay.Dv_p)
    part_o, part_lse = pl.pallas_call(
        functools.partial(_kernel, prog=prog, slots=n),
        grid=(B, lay.H, num_items),
        in_specs=(pl.BlockSpec(), (per_bh(num_items),) * 3, per_bh(E),
                  per_bh(lay.T_p * G_p, lay.D_p), k_spec, v_spec, bound_specs),
        out_specs=(per_bh((E + 1) * G_p, lay.Dv_p), per_bh((E + 1) * G_p)),
        out_shape=(jax.ShapeDtypeStruct((B, lay.H, (E + 1) * G_p, lay.Dv_p), jnp.float32),
                   jax.ShapeDtypeStruct((B, lay.H, (E + 1) * G_p), jnp.float32)),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="nsa_selected_by_block",
    )(offsets.astype(jnp.int32), work, entries, lay.group(q, lay.D_p), k_in, v_in, bound_args)
    o, lse = merge_partials(part_o, part_lse, counts, n, lay.G, Dv)  # [B, H, T, G, ...]
    o = o.transpose(0, 2, 1, 3, 4).reshape(B, T, HQ, Dv).astype(q.dtype)
    return o, lse.transpose(0, 2, 1, 3).reshape(B, T, HQ)


def _bwd_kernel(off_ref, work, ent_ref, rows_in, k_ref, v_ref, bounds, dk_ref, dv_ref, dq_ref, *,
                prog: Program, slots: int):
    """dK, dV of one work item's block (summed over its entries) and each entry's share of dQ."""
    q_ref, do_ref, lse_ref, dl_ref = rows_in
    lo, hi, start, k, v = _item(prog, work, k_ref, v_ref)
    prec = dot_precision(k.dtype)
    offset = off_ref[pl.program_id(0)]
    trash = dq_ref.shape[0] // prog.group - 1

    def chunk(c, carry):
        dk, dv = carry  # [BK, D], [BK, Dv] float32
        valid, t, q_row, out_row = _chunk_rows(prog, ent_ref, lo, hi, c, slots, trash)
        q = q_ref[q_row, :]  # [rows, D]
        do = do_ref[q_row, :]  # [rows, Dv]
        lse2 = lse_ref[q_row] * LOG2E
        delta = dl_ref[q_row]
        row_bounds = None if bounds is None else (bounds[0][q_row], bounds[1][q_row])
        p = jnp.exp2(scores(prog, q, k, prec) - lse2[:, None])  # [rows, BK]
        seen = prog.visible(offset + t, start, row_bounds) & valid[:, None]
        p = jnp.where(seen, p, 0.0)
        dv = dv + pltriton.dot(p.astype(do.dtype), do, trans_a=True,
                               precision=prec).astype(jnp.float32)
        dp = pltriton.dot(do, v, trans_b=True, precision=prec).astype(jnp.float32)  # [rows, BK]
        ds = p * (dp - delta[:, None])
        dk = dk + pltriton.dot(ds.astype(q.dtype), q, trans_a=True,
                               precision=prec).astype(jnp.float32)
        dq = pltriton.dot(ds.astype(k.dtype), k, precision=prec).astype(jnp.float32)  # [rows, D]
        dq_ref[out_row, :] = dq * prog.scale
        return dk, dv

    dk, dv = lax.fori_loop(0, _num_chunks(prog, lo, hi), chunk,
                           (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
    dk_ref[...] = dk * prog.scale
    dv_ref[...] = dv


def selected_by_block_backward(q, k, v, o, lse, do, dlse, offsets, indices, counts, *,
                               rule: MaskRule, scale: float, config: FlashConfig, bounds=None,
                               interpret: bool = False):
    """Gradients of `selected_by_block`'s (o, lse) with respect to q, k and v.

    The forward's work items again: a program recomputes the probabilities of its block's
    gathered rows from the saved log-sum-exp, adds ``p^T dO`` and ``dS^T Q`` into its block's dK
    and dV, and writes each entry's ``dS K`` to a float32 dQ buffer at the entry's slot. Blocks cut
    into several items and the n slots of each query are then summed in XLA, in a fixed order, so
    reruns are bit-identical without atomics.

    Args: as `selected_by_block`, plus its outputs ``o``, ``lse`` and their cotangents ``do``
      [B, T, HQ, Dv] and ``dlse`` [B, T, HQ] (or None).

    Returns:
      dq [B, T, HQ, D], dk [B, S, H, D], dv [B, S, H, Dv] in the dtypes of q, k, v.
    """
    B, T, HQ, D = q.shape
    S = k.shape[1]
    n = indices.shape[-1]
    if S == 0 or T == 0 or n == 0:
        return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
    lay = Launch.of(q, k, v, block_q=config.block_q, block_k=config.block_k, q_unit=1)
    dq, dk, dv = [], 0.0, 0.0
    for a, b in query_chunks(T, B * n * lay.H * lay.G_p * lay.D_p):
        part = _backward_chunk(q[:, a:b], k, v, o[:, a:b], lse[:, a:b], do[:, a:b],
                               None if dlse is None else dlse[:, a:b], offsets + a,
                               indices[:, :, a:b], counts[:, :, a:b], _cut(bounds, a, b), rule,
                               scale, config, interpret)
        dq.append(part[0])
        dk, dv = dk + part[1], dv + part[2]
    return jnp.concatenate(dq, axis=1), dk.astype(k.dtype), dv.astype(v.dtype)


def _backward_chunk(q, k, v, o, lse, do, dlse, offsets, indices, counts, bounds, rule, scale,
                    config, interpret):
    """dq in q.dtype; dk, dv float32."""
    B, T, HQ, D = q.shape
    n = indices.shape[-1]
    lay = Launch.of(q, k, v, block_q=config.block_q, block_k=config.block_k, q_unit=1)
    prog = lay.program(rule, scale)
    f32 = jnp.float32
    rows_in = backward_rows(lay, q, o, lse, do, dlse)
    entries, ent_offsets = block_entries(indices, counts, lay.num_kv_blocks)
    per_item = BWD_CHUNKS_PER_PROGRAM * config.block_q
    num_items = -(-T * n // per_item) + lay.num_kv_blocks
    (blk, lo, hi), items_of_block = work_items(ent_offsets, per_item, num_items)
    G_p, E, bk = lay.G_p, T * n, lay.block_k
    per_bh = lambda *shape: pl.BlockSpec((None, None, *shape),
                                         lambda b, h, w: (b, h, *(0,) * len(shape)))
    bound_specs, bound_args = lay.bound_inputs(bounds, all_rows=True)
    rows_p = lay.T_p * G_p
    dk, dv, dq = pl.pallas_call(
        functools.partial(_bwd_kernel, prog=prog, slots=n),
        grid=(B, lay.H, num_items),
        in_specs=(pl.BlockSpec(), (per_bh(num_items),) * 3, per_bh(E),
                  (per_bh(rows_p, lay.D_p), per_bh(rows_p, lay.Dv_p), per_bh(rows_p),
                   per_bh(rows_p)),
                  lay.kv_spec(lay.D_p), lay.kv_spec(lay.Dv_p), bound_specs),
        out_specs=(pl.BlockSpec((None, None, None, bk, lay.D_p), lambda b, h, w: (b, h, w, 0, 0)),
                   pl.BlockSpec((None, None, None, bk, lay.Dv_p), lambda b, h, w: (b, h, w, 0, 0)),
                   per_bh((E + 1) * G_p, lay.D_p)),
        out_shape=(jax.ShapeDtypeStruct((B, lay.H, num_items, bk, lay.D_p), f32),
                   jax.ShapeDtypeStruct((B, lay.H, num_items, bk, lay.Dv_p), f32),
                   jax.ShapeDtypeStruct((B, lay.H, (E + 1) * G_p, lay.D_p), f32)),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="nsa_selected_by_block_bwd",
    )(offsets.astype(jnp.int32), (blk, lo, hi), entries, rows_in, lay.heads_major(k, lay.D_p),
      lay.heads_major(v, lay.Dv_p), bound_args)
    dk, dv = _sum_items(dk, dv, *items_of_block, interpret)
    dq = dq[:, :, :E * G_p].reshape(B, lay.H, T, n, G_p, lay.D_p)
    used = jnp.arange(n, dtype=jnp.int32) < counts[..., None]  # [B, H, T, n]
    dq = jnp.sum(jnp.where(used[..., None, None], dq, 0.0), axis=3)  # [B, H, T, G_p, D_p]
    dq = dq[:, :, :, :lay.G, :D].transpose(0, 2, 1, 3, 4).reshape(B, T, HQ, D)
    return dq.astype(q.dtype), lay.seq_major(dk, D), lay.seq_major(dv, lay.Dv)


def _sum_items_kernel(first_ref, count_ref, dk_ref, dv_ref, dk_out, dv_out):
    j = pl.program_id(2)
    first = first_ref[j]

    def add(i, carry):
        dk, dv = carry
        return dk + dk_ref[first + i], dv + dv_ref[first + i]

    zeros = (jnp.zeros(dk_out.shape, jnp.float32), jnp.zeros(dv_out.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, count_ref[j], add, zeros)
    dk_out[...] = dk
    dv_out[...] = dv


def _sum_items(dk, dv, first, count, interpret: bool):
    """Per-item dK, dV [B, H, W, BK, w] -> per block [B, H, n_kb * BK, w]: block j adds its
    ``count[j]`` items from ``first[j]`` on (items are sorted by block), in order."""
    B, H, W, bk, D = dk.shape
    Dv = dv.shape[-1]
    n_kb = first.shape[-1]
    whole = lambda *shape: pl.BlockSpec((None, None, *shape),
                                        lambda b, h, j: (b, h, *(0,) * len(shape)))
    dk, dv = pl.pallas_call(
        _sum_items_kernel,
        grid=(B, H, n_kb),
        in_specs=(whole(n_kb), whole(n_kb), whole(W, bk, D), whole(W, bk, Dv)),
        out_specs=(pl.BlockSpec((None, None, bk, D), lambda b, h, j: (b, h, j, 0)),
                   pl.BlockSpec((None, None, bk, Dv), lambda b, h, j: (b, h, j, 0))),
        out_shape=(jax.ShapeDtypeStruct((B, H, n_kb * bk, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, n_kb * bk, Dv), jnp.float32)),
        interpret=interpret,
        name="nsa_selected_by_block_sum",
    )(first, count, dk, dv)
    return dk, dv
