"""The grouped flash-attention dQ and dK/dV kernels on Hopper, in Pallas Mosaic GPU.

Both have the contract of their half of `kernels/triton/flash_bwd.flash_backward` without packed
bounds: over block ranges (the compressed and window branches) or a block table (the selected
branch; dK/dV through its reverse map). dQ has the same CTA as `flash_fwd`: two compute
warpgroups of 64 rows each and a memory warpgroup streaming the K and V blocks of the CTA's
range or table row through the ring (`flash_fwd.Ring`), persistent over work units
(`flash_fwd.Units`). dK/dV swaps the roles: keys stay, row tiles stream.

Per KV block a dQ warpgroup issues the two products that need only the block, S = Q Kᵀ and
dP = dO Vᵀ, together (one wait for both); recomputes P from the forward's log-sum-exp (no
running maximum); forms dS = P ∘ (dP − δ) with δ = rowsum(O ∘ dO) − dlse; and accumulates
dQ += dS K in registers. dQ is scaled by the softmax scale once, at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nsa_jax.kernels.common import (LOG2E, BlockTable, Launch, MaskRule, ReverseTable,
                                    query_range, share_of)
from nsa_jax.kernels.mosaic_gpu.flash_fwd import (CHANNELS, COMPUTE_WGS, ROWS, MosaicFlashConfig,
                                                  Ring, RowBuffers, Units, check_smem,
                                                  check_table, launch, multiprocessors,
                                                  persistent_kernel, swizzled, table_steps,
                                                  visible, walk_plan, with_table)
from nsa_jax.kernels.triton.flash_bwd import HEAVY_BLOCKS, HEAVY_SPLITS, backward_rows


def _dq_kernel(off_ref, units: Units, rows_in, k_ref, v_ref, dq_ref, smem, barriers, *,
               rule: MaskRule, scale: float, lay: Launch, cfg: MosaicFlashConfig):
    """A persistent CTA: per unit, each compute warpgroup loads its rows' Q, dO, lse and δ (or,
    with ``prefetch_q``, finds them loaded by the memory warpgroup: `RowBuffers`), walks its KV
    blocks (waiting on and releasing those of the CTA's range outside its own) and writes its
    rows of dQ."""
    q_smem, do_smem, lse_smem, dl_smem, k_smem, v_smem, ds_smem, dq_smem = smem
    rows_ready, k_ready, v_ready, k_free, v_free, rows_free = barriers
    ring = Ring((k_smem, v_smem), (k_ready, v_ready), (k_free, v_free), cfg.num_stages)
    buffers = (q_smem, do_smem, lse_smem, dl_smem)
    prefetched = RowBuffers(buffers, rows_ready, rows_free) if cfg.prefetch_q else None
    bk = cfg.block_k
    scale2 = scale * LOG2E
    wg = lax.axis_index("wg")

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")

        @units.loop(init_carry=jnp.int32(0))
        def _(u, done):  # done: KV steps of this CTA's earlier units
            b, h, c, plan_row, block_of = units.unit(u)
            u_lo, u_hi = plan_row[0], plan_row[1]
            tile = c * COMPUTE_WGS + wg
            rows = pl.ds(tile * ROWS, ROWS)
            first = off_ref[b] + tile * lay.block_q
            if prefetched is not None:
                i = prefetched.wait(units, u, wg)
            else:
                i = wg
                for src, dst, bar in zip(rows_in, buffers, rows_ready):
                    plgpu.copy_gmem_to_smem(src.at[b, h, rows], dst.at[wg], bar.at[wg])
                for bar in rows_ready:
                    plgpu.barrier_wait(bar.at[wg])
            q, do = q_smem.at[i], do_smem.at[i]
            # lse is +inf for rows without a visible key and for padded rows: their P is 0.
            lse2 = plgpu.load(lse_smem.at[i], layout=plgpu.Layout.WGMMA.reduce(1)) * LOG2E
            delta = plgpu.load(dl_smem.at[i], layout=plgpu.Layout.WGMMA.reduce(1))
            lo, flo, fhi, hi = (plan_row[2 + 4 * wg + i] for i in range(4))
            slot_at = lambda step: ring.slot(done + step - u_lo)

            def skip(step, carry):
                ring.skip(slot_at(step))
                return carry

            def visit(step, dq, masked: bool):
                slot = slot_at(step)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])

                def s_and_dp(s_ref, dp_ref):
                    plgpu.wgmma(s_ref, q, k_smem.at[slot].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, do, v_smem.at[slot].transpose((1, 0)))
                    return s_ref[...], dp_ref[...]

                s, dp = pl.run_scoped(s_and_dp, plgpu.ACC((ROWS, bk), jnp.float32),
                                      plgpu.ACC((ROWS, bk), jnp.float32))  # [ROWS, BK] each
                plgpu.barrier_arrive(v_free.at[slot])
                p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse2, s.shape, [0]))
                if masked:
                    ok = visible(rule, first, block_of(step) * bk, lay.G_p.bit_length() - 1,
                                 (ROWS, bk))
                    p = jnp.where(ok, p, 0.0)
                ds = (p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))).astype(q_smem.dtype)
                if ds_smem is None:
                    dq = pl.run_state(lambda acc: plgpu.wgmma(acc, ds, k_smem.at[slot]))(
                        plgpu.ACC.init(dq))
                else:
                    # The interpreter's wgmma reads operands from SMEM only and cannot run
                    # `run_state`: a fresh accumulator, then an add.
                    ds_smem.at[wg][...] = ds
                    plgpu.commit_smem()

                    def ds_k(acc_ref):
                        plgpu.wgmma(acc_ref, ds_smem.at[wg], k_smem.at[slot])
                        return acc_ref[...]

                    dq = dq + pl.run_scoped(ds_k, plgpu.ACC((ROWS, lay.D_p), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            dq = plgpu.layout_cast(jnp.zeros((ROWS, lay.D_p), jnp.float32), plgpu.Layout.WGMMA)
            lax.fori_loop(u_lo, lo, skip, None)
            dq = lax.fori_loop(lo, flo, functools.partial(visit, masked=True), dq)
            dq = lax.fori_loop(flo, fhi, functools.partial(visit, masked=False), dq)
            dq = lax.fori_loop(fhi, hi, functools.partial(visit, masked=True), dq)
            lax.fori_loop(hi, u_hi, skip, None)
            # Every product reading this warpgroup's rows has completed.
            if prefetched is None:
                out = q_smem.at[wg]  # dQ goes out through Q's buffer
            else:
                plgpu.barrier_arrive(rows_free.at[i])
                out = dq_smem.at[wg]
                # The previous unit's store must have read it.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            out[...] = (dq * scale).astype(q_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out, dq_ref.at[b, h, rows])
            if prefetched is None:
                # The next unit loads its rows into these buffers.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            return done + u_hi - u_lo

        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        ring.stream(units, (k_ref, v_ref),
                    lambda step, block_of: pl.ds(block_of(step) * bk, bk),
                    on_unit=None if prefetched is None else prefetched.load(units, rows_in))
        if prefetched is not None:
            prefetched.drain(units)


def flash_backward_dq(q, k, v, o, lse, do, dlse, offsets, *, rule: MaskRule, scale: float,
                      config: MosaicFlashConfig, blocks: BlockTable | None = None,
                      interpret: bool | plgpu.InterpretGPUParams = False):
    """dQ of `flash_fwd.flash_forward`'s (o, lse) over a block range, or over the KV blocks of
    ``blocks``.

    Args:
      q, k, v, offsets, rule, scale, blocks: as given to the forward; bfloat16 or float16.
        ``blocks`` refers to blocks of ``config.block_k`` keys.
      o, lse: its outputs. do: cotangent of o [B, T, HQ, Dv]; dlse: of lse [B, T, HQ] (or None).
      config: tiling (``block_k``, ``num_stages``, ``num_ctas``, ``prefetch_q``: all of a unit's
        rows; ``pingpong`` is not used).
      interpret: run under the Mosaic GPU interpreter (CPU); True, or its parameters.

    Returns:
      dq [B, T, HQ, D] in q.dtype.
    """
    if k.shape[1] == 0 or q.shape[1] == 0:
        return jnp.zeros_like(q)
    lay = launch(q, k, v, config.block_k)
    check_table(blocks, lay)
    dtype = q.dtype
    stages, bk = config.num_stages, config.block_k
    n_cta = lay.T_p // (COMPUTE_WGS * lay.block_q)
    num_ctas = min(n_cta * lay.H * lay.B,
                   config.num_ctas or (3 if interpret else multiprocessors()))

    smem_2d = lambda lead, rows, width: swizzled((lead, rows, width), dtype)
    sets = COMPUTE_WGS * (2 if config.prefetch_q else 1)  # row buffers: `RowBuffers`

    smem = (smem_2d(sets, ROWS, lay.D_p), smem_2d(sets, ROWS, lay.Dv_p),
            plgpu.SMEM((sets, ROWS), jnp.float32), plgpu.SMEM((sets, ROWS), jnp.float32),
            smem_2d(stages, bk, lay.D_p), smem_2d(stages, bk, lay.Dv_p),
            smem_2d(COMPUTE_WGS, ROWS, bk) if interpret else None,
            smem_2d(COMPUTE_WGS, ROWS, lay.D_p) if config.prefetch_q else None)
    # ds_smem (the interpreter's staging of dS) is not on the GPU.
    check_smem(smem[:6] + smem[7:], config, lay.D_p, lay.Dv_p)

    def body(off_ref, plan_ref, tab_ref, q_ref, do_ref, lse_ref, dl_ref, k_ref, v_ref, dq_ref):
        ring_bars = (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                     plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
                     plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages))
        barriers = ((plgpu.Barrier(num_barriers=sets),) * 4, *ring_bars,
                    plgpu.Barrier(num_barriers=sets) if config.prefetch_q else None)
        units = Units(lay, n_cta, rule.causal, num_ctas, plan_ref,
                      table_steps(tab_ref, blocks, lay))
        pl.run_scoped(
            lambda smem, bars: _dq_kernel(off_ref, units, (q_ref, do_ref, lse_ref, dl_ref), k_ref,
                                          v_ref, dq_ref, smem, bars, rule=rule, scale=scale,
                                          lay=lay, cfg=config),
            smem, barriers, collective_axes="wg")

    offsets = offsets.astype(jnp.int32)
    q_g, do_g, lse_g, delta = backward_rows(lay, q, o, lse, do, dlse)
    entry, table_args = with_table(body, None if blocks is None else blocks.table)
    dq = persistent_kernel(
        entry, out_type=lay.rows_shape(dtype, lay.D_p), num_ctas=num_ctas, interpret=interpret,
        name="nsa_mosaic_flash_bwd_dq",
    )(offsets, walk_plan(rule, lay, offsets, blocks), *table_args, q_g, do_g, lse_g, delta,
      lay.heads_major(k, lay.D_p), lay.heads_major(v, lay.Dv_p))
    return lay.ungroup(dq, q.shape[3])


# dK/dV of a range walk splits each CTA's rows into shares (their sums added in XLA) so that
# about DKV_UNITS_PER_SM units per multiprocessor exist, at most DKV_MAX_SPLITS shares of at
# least DKV_MIN_SHARE row tiles each. Not yet tuned on a GPU.
DKV_UNITS_PER_SM = 4
DKV_MAX_SPLITS = 16
DKV_MIN_SHARE = 8


def _dkv_kernel(off_ref, units: Units, kv_in, rows_in, dk_ref, dv_ref, smem, barriers, *,
                rule: MaskRule, scale: float, lay: Launch, splits: int, stages: int,
                table: bool):
    """A persistent CTA of dK/dV: per unit (b, h, c), CTA tile c // splits owns 2 x 64 keys, one
    block per compute warpgroup, and share c % splits of the query row tiles that see them; the
    memory warpgroup streams those tiles' Q, dO, lse and δ through the ring. Each warpgroup takes
    S^T = K Q^T and dP^T = V dO^T per tile (keys on wgmma's M, rows on its N), then
    dV += P^T dO and dK += dS^T Q, and writes its float32 partial sums at the unit's end.

    With ``table`` (the selected branch) both warpgroups own the same 64 keys, block
    ``plan[2]``, and take the unit's row tiles in turn (tile i to warpgroup i % 2; the ring has
    an even number of slots, so each slot has one owner, which alone releases it); each writes
    its own partial sums, slot (c, wg)."""
    k_smem, v_smem, out_smem, p_smem, ring_smem = smem
    kv_ready, ring_ready, ring_free = barriers
    ring = Ring(ring_smem, ring_ready, ring_free, stages)
    q_ring, do_ring, lse_ring, dl_ring = ring_smem
    R = ROWS  # rows per streamed tile
    scale2 = scale * LOG2E
    wg = lax.axis_index("wg")

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")

        @units.loop(init_carry=jnp.int32(0))
        def _(u, done):  # done: row tiles of this CTA's earlier units
            b, h, c, plan_row, block_of = units.unit(u)
            u_lo, u_hi = plan_row[0], plan_row[1]
            if table:
                key0 = plan_row[2] * ROWS
                out_at = lambda ref, cols: ref.at[b, h, c, wg, pl.ds(0, ROWS), cols]
            else:
                share = lax.rem(c, jnp.int32(splits))
                key0 = lax.div(c, jnp.int32(splits)) * (COMPUTE_WGS * ROWS) + wg * ROWS
                out_at = lambda ref, cols: ref.at[b, h, share, pl.ds(key0, ROWS), cols]
            keys = pl.ds(key0, ROWS)
            for src, dst, bar in zip(kv_in, (k_smem, v_smem), kv_ready):
                plgpu.copy_gmem_to_smem(src.at[b, h, keys], dst.at[wg], bar.at[wg])
            for bar in kv_ready:
                plgpu.barrier_wait(bar.at[wg])
            k, v = k_smem.at[wg], v_smem.at[wg]
            offset = off_ref[b]
            lo, flo, fhi, hi = (plan_row[2 + 4 * wg + i] for i in range(4))
            slot_at = lambda step: ring.slot(done + step - u_lo)

            def skip(step, carry):
                ring.skip(slot_at(step))
                return carry

            def visit(step, carry, masked: bool):
                dk, dv = carry  # [BK, D_p], [BK, Dv_p] float32
                slot = slot_at(step)
                for ready in ring.ready:
                    plgpu.barrier_wait(ready.at[slot])
                q, do = q_ring.at[slot], do_ring.at[slot]

                def st_and_dpt(st_ref, dpt_ref):
                    plgpu.wgmma(st_ref, k, q.transpose((1, 0)))
                    plgpu.wgmma(dpt_ref, v, do.transpose((1, 0)))
                    return st_ref[...], dpt_ref[...]

                st, dpt = pl.run_scoped(st_and_dpt, plgpu.ACC((ROWS, R), jnp.float32),
                                        plgpu.ACC((ROWS, R), jnp.float32))  # [BK, R] each
                lse2 = plgpu.load(lse_ring.at[slot], layout=plgpu.Layout.WGMMA.reduce(0)) * LOG2E
                delta = plgpu.load(dl_ring.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                pt = jnp.exp2(st * scale2 - lax.broadcast_in_dim(lse2, st.shape, [1]))
                if masked:
                    ok = visible(rule, offset + block_of(step) * lay.block_q, key0,
                                 lay.G_p.bit_length() - 1, (ROWS, R), key_axis=0)
                    pt = jnp.where(ok, pt, 0.0)
                dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))
                pt, dst = pt.astype(q_ring.dtype), dst.astype(q_ring.dtype)
                if p_smem is None:
                    def accumulate(refs):
                        plgpu.wgmma(refs[0], pt, do)
                        plgpu.wgmma(refs[1], dst, q)

                    dv, dk = pl.run_state(accumulate)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                else:
                    # The interpreter's wgmma reads operands from SMEM only and cannot run
                    # `run_state`: fresh accumulators, then adds.
                    p_smem.at[wg, 0][...] = pt
                    p_smem.at[wg, 1][...] = dst
                    plgpu.commit_smem()

                    def products(dv_ref, dk_ref):
                        plgpu.wgmma(dv_ref, p_smem.at[wg, 0], do)
                        plgpu.wgmma(dk_ref, p_smem.at[wg, 1], q)
                        return dv_ref[...], dk_ref[...]

                    ddv, ddk = pl.run_scoped(products, plgpu.ACC((ROWS, lay.Dv_p), jnp.float32),
                                             plgpu.ACC((ROWS, lay.D_p), jnp.float32))
                    dv, dk = dv + ddv, dk + ddk
                for free in ring.free:
                    plgpu.barrier_arrive(free.at[slot])
                return dk, dv

            zeros = lambda width: plgpu.layout_cast(jnp.zeros((ROWS, width), jnp.float32),
                                                    plgpu.Layout.WGMMA)
            fresh = lambda: (zeros(lay.D_p), zeros(lay.Dv_p))
            if table:
                # Units have an even number of steps, so a warpgroup's steps keep their parity.
                dk, dv = lax.fori_loop(0, lax.div(u_hi - u_lo, 2), lambda i, carry: visit(
                    u_lo + 2 * i + wg, carry, masked=True), fresh())
            else:
                lax.fori_loop(u_lo, lo, skip, None)
                carry = lax.fori_loop(lo, flo, functools.partial(visit, masked=True), fresh())
                carry = lax.fori_loop(flo, fhi, functools.partial(visit, masked=False), carry)
                dk, dv = lax.fori_loop(fhi, hi, functools.partial(visit, masked=True), carry)
                lax.fori_loop(hi, u_hi, skip, None)
            # Out through one 64-column float32 buffer per warpgroup, a slice at a time.
            for acc, ref in ((dk * scale, dk_ref), (dv, dv_ref)):
                for j in range(acc.shape[1] // CHANNELS):
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem.at[wg][...] = acc[:, j * CHANNELS:(j + 1) * CHANNELS]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                            out_at(ref, pl.ds(j * CHANNELS, CHANNELS)))
            return done + u_hi - u_lo

        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        ring.stream(units, rows_in, lambda step, block_of: pl.ds(block_of(step) * R, R))


def _full_tiles(rule: MaskRule, key0, offset, block_q: int):
    """[f_lo, f_hi): the row tiles (of ``block_q`` queries, query 0 at position ``offset``) whose
    every row sees every key of the 64 from index ``key0``; unbounded ends are +-2**30."""
    far = jnp.int32(2 ** 30)
    first_pos = key0 * rule.key_stride + rule.key_offset
    last_pos = (key0 + ROWS - 1) * rule.key_stride + rule.key_offset
    ceil_div = lambda a: -((-a) // block_q)
    w = rule.window
    if rule.causal:  # first query >= last key; last query - first key < w
        f_lo = ceil_div(last_pos - offset)
        f_hi = (first_pos + w - block_q - offset) // block_q + 1 if w else far
    elif w:  # |query - key| < w for every pair
        f_lo = ceil_div(last_pos - w + 1 - offset)
        f_hi = (first_pos + w - block_q - offset) // block_q + 1
    else:
        f_lo, f_hi = -far, far
    whole = key0 + ROWS <= rule.num_keys
    return jnp.where(whole, f_lo, far), jnp.where(whole, f_hi, far)


def _dkv_plan(rule: MaskRule, lay: Launch, offsets, n_kv: int, splits: int):
    """int32 [B, 1, n_kv * splits, 10] in `walk_plan`'s format: per unit the share [lo, hi) of
    the row tiles that see the CTA's keys, then per warpgroup the row tiles that see its 64 keys
    within that share, and among them those that see all 64 (no mask)."""
    n_qt = lay.T_p // lay.block_q
    key0 = jnp.arange(n_kv * COMPUTE_WGS, dtype=jnp.int32) * ROWS  # [n_kv * 2]
    ilo, ihi = jax.vmap(lambda off: jax.vmap(lambda k0: query_range(
        rule, k0, ROWS, off, lay.block_q, n_qt))(key0))(offsets)  # [B, n_kv * 2] each
    f_lo, f_hi = jax.vmap(lambda off: jax.vmap(lambda k0: _full_tiles(
        rule, k0, off, lay.block_q))(key0))(offsets)
    ilo, ihi, f_lo, f_hi = (x.reshape(lay.B, n_kv, 1, COMPUTE_WGS)
                            for x in (ilo, ihi, f_lo, f_hi))
    seen = ihi > ilo
    u_lo = jnp.min(jnp.where(seen, ilo, n_qt), axis=-1)
    u_hi = jnp.maximum(jnp.max(jnp.where(seen, ihi, 0), axis=-1), u_lo)  # [B, n_kv, 1]
    s = jnp.arange(splits, dtype=jnp.int32)
    s_lo, s_hi = share_of(u_lo, u_hi, s, splits)  # [B, n_kv, splits]
    lo = jnp.clip(ilo, s_lo[..., None], s_hi[..., None])
    hi = jnp.clip(ihi, lo, s_hi[..., None])  # [B, n_kv, splits, 2]
    flo = jnp.clip(f_lo, lo, hi)
    fhi = jnp.clip(f_hi, flo, hi)
    per_wg = jnp.stack([lo, flo, fhi, hi], axis=-1).reshape(lay.B, n_kv, splits,
                                                            4 * COMPUTE_WGS)
    plan = jnp.concatenate([s_lo[..., None], s_hi[..., None], per_wg], axis=-1)
    return plan.reshape(lay.B, 1, n_kv * splits, 10).astype(jnp.int32)


def _dkv_table_plan(reverse: ReverseTable, n_kb: int, per: int):
    """int32 [B, H, n_kb + n_heavy * HEAVY_SPLITS, 10] in `walk_plan`'s format, and the heavy
    blocks int32 [B, H, n_heavy]. Unit j < n_kb walks all the row tiles of the table rows that
    list KV block j (``per`` row tiles each), unless j is one of the n_heavy most listed blocks
    of its head, which are cut into HEAVY_SPLITS shares (units n_kb + i * HEAVY_SPLITS + s) so
    that no block serialises on one CTA. A plan row holds (0, steps, block, first entry)."""
    ro = reverse.offsets.astype(jnp.int32)
    first, last = ro[..., :-1], ro[..., 1:]  # [B, H, n_kb]
    n_heavy = min(HEAVY_BLOCKS, n_kb)
    _, heavy = lax.top_k(last - first, n_heavy)  # [B, H, n_heavy]
    heavy = heavy.astype(jnp.int32)
    is_heavy = jnp.any(heavy[..., None, :] == jnp.arange(n_kb)[:, None], axis=-1)
    s_lo, s_hi = share_of(jnp.take_along_axis(first, heavy, -1)[..., None],
                          jnp.take_along_axis(last, heavy, -1)[..., None],
                          jnp.arange(HEAVY_SPLITS, dtype=jnp.int32), HEAVY_SPLITS)
    B, H = first.shape[:2]
    block = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_kb, dtype=jnp.int32), (B, H, n_kb)),
                             jnp.repeat(heavy, HEAVY_SPLITS, axis=-1)], axis=-1)
    e_lo = jnp.concatenate([first, s_lo.reshape(B, H, -1)], axis=-1)
    # A heavy block's own unit walks nothing: `_table_sums` replaces its sums by its shares'.
    e_hi = jnp.concatenate([jnp.where(is_heavy, first, last), s_hi.reshape(B, H, -1)], axis=-1)
    z = jnp.zeros_like(block)
    plan = jnp.stack([z, (e_hi - e_lo) * per, block, e_lo, z, z, z, z, z, z], axis=-1)
    return plan, heavy


def flash_backward_dkv(q, k, v, o, lse, do, dlse, offsets, *, rule: MaskRule, scale: float,
                       config: MosaicFlashConfig, blocks: BlockTable | None = None,
                       reverse: ReverseTable | None = None,
                       interpret: bool | plgpu.InterpretGPUParams = False):
    """dK and dV of `flash_fwd.flash_forward`'s (o, lse) over a block range, or over the KV
    blocks of ``blocks`` (blocks of 64 keys) with ``reverse`` its `metadata.reverse_map`.

    Args: as `flash_backward_dq`; ``config.block_k`` must be 64 (the keys of one warpgroup) and
      ``config.prefetch_q`` False; with a table, ``config.num_stages`` even.

    Returns:
      dk [B, N, H, D] and dv [B, N, H, Dv] in the dtypes of k and v.
    """
    if config.block_k != ROWS:
        raise ValueError(f"the Mosaic GPU dK/dV kernel takes block_k={ROWS} (the keys of one "
                         f"warpgroup), got MosaicFlashConfig.block_k={config.block_k}")
    if config.prefetch_q:
        raise ValueError("the Mosaic GPU dK/dV kernel streams its rows through its ring already "
                         "and has no prefetch_q; got MosaicFlashConfig.prefetch_q=True")
    if (blocks is None) != (reverse is None):
        raise ValueError("flash_backward_dkv takes `reverse` exactly when it takes `blocks`")
    table = blocks is not None
    if table and config.num_stages % 2:
        raise ValueError("the Mosaic GPU dK/dV kernel walks a table with an even number of "
                         f"ring slots, got MosaicFlashConfig.num_stages={config.num_stages}")
    if k.shape[1] == 0 or q.shape[1] == 0:
        return jnp.zeros_like(k), jnp.zeros_like(v)
    if table:
        check_table(blocks, launch(q, k, v, ROWS))
        # Whole selection tiles (the reverse map's unit) exist as rows. (Rows past the array
        # would read as zeros and add nothing, but are not left to TMA's bounds.)
        lay = launch(q, k, v, ROWS, q_unit=blocks.q_tile)
    else:
        lay = launch(q, k, v, COMPUTE_WGS * ROWS)
    dtype, stages = q.dtype, config.num_stages
    sms = 3 if interpret else multiprocessors()
    offsets = offsets.astype(jnp.int32)
    if table:
        n_kb = lay.N_p // ROWS
        if reverse.offsets.shape[-1] != n_kb + 1:
            raise ValueError(f"reverse.offsets has {reverse.offsets.shape[-1]} entries per head; "
                             f"a reverse map of {ROWS}-key blocks of {k.shape[1]} keys has "
                             f"{n_kb + 1}")
        per = blocks.q_tile * lay.G_p // ROWS  # row tiles per table row; even
        plan, heavy = _dkv_table_plan(reverse, n_kb, per)
        splits, n_cta = 1, plan.shape[2]
        slots = (n_cta, COMPUTE_WGS, ROWS)
    else:
        n_kv = lay.N_p // (COMPUTE_WGS * ROWS)
        n_qt = lay.T_p // lay.block_q
        # Row tiles that can see one CTA's keys: all of them without a window, else about the
        # window on either side of the keys' positions.
        span = n_qt
        if rule.window:
            span = min(n_qt, (COMPUTE_WGS * ROWS * rule.key_stride + 2 * rule.window)
                       // lay.block_q + 2)
        splits = max(1, min(DKV_MAX_SPLITS, DKV_UNITS_PER_SM * sms // (lay.B * lay.H * n_kv),
                            span // DKV_MIN_SHARE))
        splits = 1 << (splits.bit_length() - 1)
        n_cta = n_kv * splits
        plan = _dkv_plan(rule, lay, offsets, n_kv, splits)
        slots = (splits, lay.N_p)
    num_ctas = min(n_cta * lay.H * lay.B, config.num_ctas or sms)

    smem_2d = lambda lead, rows, width: swizzled((*lead, rows, width), dtype)

    ring_smem = (smem_2d((stages,), ROWS, lay.D_p), smem_2d((stages,), ROWS, lay.Dv_p),
                 plgpu.SMEM((stages, ROWS), jnp.float32), plgpu.SMEM((stages, ROWS), jnp.float32))
    smem = (smem_2d((COMPUTE_WGS,), ROWS, lay.D_p), smem_2d((COMPUTE_WGS,), ROWS, lay.Dv_p),
            plgpu.SMEM((COMPUTE_WGS, ROWS, CHANNELS), jnp.float32), None, ring_smem)
    check_smem(smem, config, lay.D_p, lay.Dv_p)
    if interpret:  # the interpreter's wgmma takes P and dS from shared memory
        smem = (*smem[:3], smem_2d((COMPUTE_WGS, 2), ROWS, ROWS), ring_smem)

    def body(off_ref, plan_ref, tab_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, dl_ref, dk_ref,
             dv_ref):
        # With a table each ring slot has one owner (see `_dkv_kernel`).
        owners = 1 if table else COMPUTE_WGS
        barriers = ((plgpu.Barrier(num_barriers=COMPUTE_WGS),) * 2,
                    (plgpu.Barrier(num_barriers=stages),) * 4,
                    (plgpu.Barrier(num_arrivals=owners, num_barriers=stages),) * 4)
        step_map = None
        if table:
            # Step s of a unit: row tile s % per of the table row in its entry s // per.
            step_map = lambda b, h, c, plan: lambda step: (
                tab_ref[b, h, plan[3] + lax.div(step, jnp.int32(per))] * per
                + lax.rem(step, jnp.int32(per)))
        # With a table the heavy blocks' shares (the last units) go first.
        units = Units(lay, n_cta, table, num_ctas, plan_ref, step_map=step_map)
        pl.run_scoped(
            lambda smem, bars: _dkv_kernel(off_ref, units, (k_ref, v_ref),
                                           (q_ref, do_ref, lse_ref, dl_ref), dk_ref, dv_ref, smem,
                                           bars, rule=rule, scale=scale, lay=lay, splits=splits,
                                           stages=stages, table=table),
            smem, barriers, collective_axes="wg")

    rows = backward_rows(lay, q, o, lse, do, dlse)
    part = lambda width: jax.ShapeDtypeStruct((lay.B, lay.H, *slots, width), jnp.float32)
    entry, table_args = with_table(body, reverse.tiles if table else None)
    dk, dv = persistent_kernel(
        entry, out_type=(part(lay.D_p), part(lay.Dv_p)), num_ctas=num_ctas, interpret=interpret,
        name="nsa_mosaic_flash_bwd_dkv",
    )(offsets, plan, *table_args, lay.heads_major(k, lay.D_p), lay.heads_major(v, lay.Dv_p),
      *rows)
    if table:
        dk, dv = (_table_sums(x, heavy, n_kb) for x in (dk, dv))
    else:
        dk, dv = dk.sum(axis=2), dv.sum(axis=2)
    return lay.seq_major(dk, lay.D).astype(k.dtype), lay.seq_major(dv, lay.Dv).astype(v.dtype)


def _table_sums(parts, heavy, n_kb: int):
    """[B, H, N_p, width] from the table walk's partial sums [B, H, units, 2, 64, width]: both
    warpgroups' sums, and each heavy block's sum over its shares in place of its own unit's."""
    B, H = parts.shape[:2]
    parts = parts.sum(axis=3)
    sums = parts[:, :, n_kb:].reshape(B, H, heavy.shape[-1], HEAVY_SPLITS, *parts.shape[3:])
    at = (jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None], heavy)
    out = parts[:, :, :n_kb].at[at].set(sums.sum(axis=3))
    return out.reshape(B, H, n_kb * ROWS, parts.shape[-1])
