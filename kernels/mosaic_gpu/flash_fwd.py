"""The grouped flash-attention forward core on Hopper, in Pallas Mosaic GPU.

Same contract as `kernels/triton/flash_fwd.py` (one core for the three branches, `MaskRule`
masks, an optional `BlockTable`), written for the sm90 machinery:

- A CTA runs three warpgroups. Two compute warpgroups each own 64 rows of `common.Launch`'s
  grouped layout (``64 // G_p`` queries times the G_p heads of one KV head, so wgmma's 64-row
  minimum is met at any G up to 64); a memory warpgroup streams the KV blocks both need through
  a ring of ``num_stages`` SMEM slots with TMA, each slot guarded by a ready and a free barrier.
- Scores and the output accumulate with wgmma in registers; the softmax runs in float32 in
  log2 units.
- The KV blocks a CTA walks are decided outside the kernel: in range mode XLA computes, per
  warpgroup, the range its queries can see and the part of it they see whole (no mask needed),
  and the memory warpgroup streams the union; in table mode both warpgroups walk their table row.
  A warpgroup waits on and releases the blocks outside its own range without computing, so the
  barriers' phases stay in step.
- CTAs are persistent (one per multiprocessor) and take work units in turn; the KV ring runs on
  from one unit to the next. With ``pingpong`` the two compute warpgroups keep half a step apart
  on a shared barrier, so one's softmax overlaps the other's products.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nsa_jax.kernels.common import (LN2, LOG2E, BlockTable, Launch, MaskRule, bounded_ranges,
                                    no_keys, pow2)

ROWS = 64  # rows per compute warpgroup: wgmma's M
COMPUTE_WGS = 2
# Channels are padded to whole 128-byte swizzle rows of 16-bit elements.
CHANNELS = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicFlashConfig:
    """Tiling of the Mosaic GPU flash kernels; not semantics.

    Attributes:
      block_k: keys per KV block (64 or 128; the unit a `BlockTable` refers to).
      num_stages: KV blocks in flight (SMEM ring slots), at least 2.
      num_ctas: persistent CTAs; None: one per multiprocessor.
      pingpong: keep the two compute warpgroups half a step apart, so that one's softmax runs
        while the other's products do (FA3's schedule).
      prefetch_q: (forward and dQ) the memory warpgroup loads the next unit's rows (Q; for dQ
        also dO, lse and δ) into a second set of buffers during the current unit, and the
        output leaves through a buffer of its own whose store is awaited only before its next
        use; without it each unit waits for its rows' copies at the start and for its output's
        store at the end. Short walks (the window and selected branches: a few KV blocks per
        unit) are where that wait weighs. Where the forward's own output buffers would not fit
        (128-key blocks) and D == Dv, its output leaves through the Q buffer it has just
        finished with, which goes back to the memory warpgroup at the next unit's start.
    """

    block_k: int = 64
    num_stages: int = 2
    num_ctas: int | None = None
    pingpong: bool = True
    prefetch_q: bool = False

    def __post_init__(self):
        if self.block_k not in (64, 128):
            raise ValueError(f"MosaicFlashConfig.block_k={self.block_k!r} must be 64 or 128")
        if not isinstance(self.num_stages, int) or self.num_stages < 2:
            raise ValueError(
                f"MosaicFlashConfig.num_stages={self.num_stages!r} must be an int >= 2")
        if self.num_ctas is not None and (not isinstance(self.num_ctas, int)
                                          or self.num_ctas < 1):
            raise ValueError(
                f"MosaicFlashConfig.num_ctas={self.num_ctas!r} must be a positive int or None")
        for name in ("pingpong", "prefetch_q"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(f"MosaicFlashConfig.{name}={getattr(self, name)!r} must be a bool")


def multiprocessors() -> int:
    # H100 / H200 SXM have 132; the interpreter and unknown devices take the same.
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def swizzled(shape: tuple[int, ...], dtype) -> plgpu.SMEM:
    """An SMEM buffer of 16-bit rows in wgmma's operand layout: tiles of 8 rows, 128-byte
    swizzle (its last dimension a multiple of 64)."""
    transforms = (plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)),
                  plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


# Shared memory one CTA may use on sm90 (H100, H200).
SMEM_BYTES = 232448
# What the compiler adds to a kernel's buffers (barriers, alignment): 2,696 bytes for the
# forward at 128-key blocks, 2 stages, prefetch and O buffers of its own.
SMEM_SLACK = 4096


def smem_bytes(buffers) -> int:
    """Bytes of a tree of `plgpu.SMEM` buffers."""
    return sum(math.prod(b.shape) * jnp.dtype(b.dtype).itemsize for b in jax.tree.leaves(buffers))


def check_smem(buffers, config, D: int, Dv: int):
    """ValueError when ``buffers`` (a tree of `plgpu.SMEM`) cannot fit one CTA's shared memory,
    instead of the compiler's error at lowering. The compiler adds up to a few KiB (barriers,
    alignment), so a tiling just under the limit may still fail there."""
    need = smem_bytes(buffers)
    if need > SMEM_BYTES:
        raise ValueError(f"{config} needs {need} bytes of shared memory at D={D}, Dv={Dv}, over "
                         f"the {SMEM_BYTES} of an sm90 multiprocessor; use fewer num_stages, "
                         "block_k=64 or prefetch_q=False")


def persistent_kernel(body, *, out_type, num_ctas: int, interpret, name: str):
    """`plgpu.kernel` of ``num_ctas`` persistent CTAs ("cta") of two compute warpgroups and a
    memory warpgroup ("wg"), lowered with warpgroup semantics; ``interpret``: False, True or
    `plgpu.InterpretGPUParams`."""
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(num_ctas,),
        grid_names=("cta",),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret is True else interpret or None,
        kernel_name=name,
    )


def with_table(body, table):
    """(kernel entry, its table operands): ``body(off, plan, tab_ref, *refs)`` takes the ref of
    ``table`` (an int array: a `BlockTable`'s table, a reverse map's tiles) after the plan, or
    None without one."""
    if table is None:
        return (lambda off, plan, *refs: body(off, plan, None, *refs)), ()
    return body, (table.astype(jnp.int32),)


def launch(q, k, v, block_k: int, q_unit: int | None = None) -> Launch:
    """The grouped layout of one call: 64 rows per warpgroup, CTAs of two warpgroups; T padded
    to a multiple of ``q_unit`` queries (default: one CTA's)."""
    G_p = pow2(q.shape[2] // k.shape[2])
    if G_p > ROWS:
        raise ValueError(f"the Mosaic GPU kernels take at most {ROWS} query heads per KV head, "
                         f"got {q.shape[2] // k.shape[2]}")
    block_q = ROWS // G_p
    lay = Launch.of(q, k, v, block_q=block_q, block_k=block_k,
                    q_unit=q_unit or COMPUTE_WGS * block_q)
    return dataclasses.replace(lay, D_p=round_up(lay.D, CHANNELS),
                               Dv_p=round_up(lay.Dv, CHANNELS))


def check_table(blocks: BlockTable | None, lay: Launch):
    cta_q = COMPUTE_WGS * lay.block_q
    if blocks is not None and blocks.q_tile % cta_q:
        raise ValueError(f"the table's q_tile={blocks.q_tile} must be a multiple of {cta_q}, "
                         "the queries of one Mosaic GPU CTA")


def visible(rule: MaskRule, first, start, group_shift: int, shape: tuple[int, int],
            key_axis: int = 1):
    """bool ``shape`` in the wgmma layout: `common.visible` of rows (queries from position
    ``first``, ``1 << group_shift`` heads each) against the keys from index ``start``, keys along
    ``key_axis`` and rows along the other axis."""
    row = plgpu.broadcasted_iota(jnp.int32, shape, 1 - key_axis, layout=plgpu.Layout.WGMMA)
    j = start + plgpu.broadcasted_iota(jnp.int32, shape, key_axis, layout=plgpu.Layout.WGMMA)
    diff = (first + lax.shift_right_logical(row, group_shift)) - (
        j * rule.key_stride + rule.key_offset)
    ok = j < rule.num_keys
    if rule.causal:
        ok = ok & (diff >= 0)
        if rule.window:
            ok = ok & (diff < rule.window)
    elif rule.window:
        ok = ok & (diff < rule.window) & (diff > -rule.window)
    return ok


def _row_vector(value):
    return plgpu.layout_cast(jnp.full((ROWS,), value, jnp.float32),
                             plgpu.Layout.WGMMA.reduce(1))


@dataclasses.dataclass(frozen=True)
class Units:
    """The work units of a persistent launch: unit (b, h, c) is CTA tile c of KV head h of row b,
    and a CTA takes units ``num_ctas`` apart, in order of c, or from the last c when
    ``reverse`` (so that under a causal rule the tiles that walk most come first).
    ``plan_ref`` int32 [B, 1 or H, n_cta, 10] holds each unit's steps (`walk_plan`); step e
    is KV block e, or what ``step_map(b, h, c, plan)`` maps it to (`table_steps`)."""

    lay: Launch
    n_cta: int
    reverse: bool
    num_ctas: int
    plan_ref: object
    step_map: object = None

    def loop(self, init_carry):
        """`pl.loop` over this CTA's units, carrying ``init_carry``."""
        return pl.loop(lax.axis_index("cta"), self.total, step=self.num_ctas,
                       init_carry=init_carry)

    @property
    def total(self) -> int:
        return self.n_cta * self.lay.H * self.lay.B

    def ordinal(self, u):
        """How many units this CTA took before unit u."""
        return lax.div(u - lax.axis_index("cta"), jnp.int32(self.num_ctas))

    def count(self):
        """How many units this CTA takes."""
        return lax.div(self.total - lax.axis_index("cta") + self.num_ctas - 1,
                       jnp.int32(self.num_ctas))

    def unit(self, u):
        """(b, h, c, plan ref, step -> KV block) of work unit u."""
        lay = self.lay
        c, hb = lax.div(u, jnp.int32(lay.H * lay.B)), lax.rem(u, jnp.int32(lay.H * lay.B))
        h, b = lax.div(hb, jnp.int32(lay.B)), lax.rem(hb, jnp.int32(lay.B))
        if self.reverse:
            c = self.n_cta - 1 - c
        plan = self.plan_ref.at[b, h if self.plan_ref.shape[1] > 1 else 0, c]
        if self.step_map is None:
            block_of = lambda step: step
        else:
            block_of = self.step_map(b, h, c, plan)
        return b, h, c, plan, block_of


def table_steps(tab_ref, blocks: BlockTable | None, lay: Launch):
    """`Units.step_map` of a table walk: step e of CTA tile c is entry e of the table row
    holding the tile's queries; None without a table."""
    if blocks is None:
        return None

    def step_map(b, h, c, plan):
        row = (c * COMPUTE_WGS * lay.block_q) // blocks.q_tile
        return lambda step: tab_ref[b, h, row, step]

    return step_map


@dataclasses.dataclass(frozen=True)
class Ring:
    """An SMEM ring of ``stages`` slots that the memory warpgroup fills for the compute
    warpgroups. Each buffer [stages, ...] has per slot a ready barrier (its copy landed) and a
    free barrier (one arrival per compute warpgroup). The steps of all of a CTA's units form one
    sequence, so slots and barrier phases run on across units."""

    buffers: tuple
    ready: tuple
    free: tuple
    stages: int

    def slot(self, i):
        return lax.rem(i, jnp.int32(self.stages))

    def skip(self, slot):
        """A compute warpgroup's pass over a step outside its own range: wait and release, so
        its barrier phases stay in step."""
        for ready, free in zip(self.ready, self.free):
            plgpu.barrier_wait(ready.at[slot])
            plgpu.barrier_arrive(free.at[slot])

    def stream(self, units: Units, srcs, rows_of, on_unit=None):
        """The memory warpgroup: copies each unit's steps into the ring, a buffer's slot once
        both compute warpgroups have released it. ``srcs``: one [B, H, n, ...] GMEM ref per
        buffer; ``rows_of(step, block_of)``: the `pl.ds` of a step's rows in them;
        ``on_unit(u, b, h, c)``: issued before each unit's steps."""

        @units.loop(init_carry=jnp.int32(0))
        def issued(u, done):
            b, h, c, plan, block_of = units.unit(u)
            u_lo, u_hi = plan[0], plan[1]
            if on_unit is not None:
                on_unit(u, b, h, c)

            @pl.loop(u_lo, u_hi)
            def _(step):
                i = done + step - u_lo
                slot = self.slot(i)
                rows = rows_of(step, block_of)
                for src, buf, ready, free in zip(srcs, self.buffers, self.ready, self.free):
                    pl.when(i >= self.stages)(lambda: plgpu.barrier_wait(free.at[slot]))
                    plgpu.copy_gmem_to_smem(src.at[b, h, rows], buf.at[slot], ready.at[slot])

            return done + u_hi - u_lo

        # Observe the last releases too, so that every phase of the ring has been waited on
        # before the barriers go out of scope (the interpreter checks this).
        @pl.loop(jnp.maximum(0, issued - self.stages), issued)
        def _(i):
            for free in self.free:
                plgpu.barrier_wait(free.at[self.slot(i)])


@dataclasses.dataclass(frozen=True)
class RowBuffers:
    """Two sets per compute warpgroup of the buffers a unit's rows need (Q; or Q, dO, lse, δ),
    which the memory warpgroup fills a unit ahead. Each buffer [2 * COMPUTE_WGS, ...] has a ready
    barrier per set (its copy landed, one per buffer: each TMA copy needs its own), and each set
    one free barrier that its warpgroup arrives at once it no longer reads the set."""

    buffers: tuple
    ready: tuple
    free: object

    @staticmethod
    def index(n, wg):
        """The set of warpgroup ``wg`` in this CTA's unit number n."""
        return lax.rem(n, jnp.int32(2)) * COMPUTE_WGS + wg

    def load(self, units: Units, srcs):
        """The memory warpgroup's `Ring.stream` hook: copies unit u's rows of ``srcs`` (one
        [B, H, rows, ...] GMEM ref per buffer) into its sets, once the unit two before released
        them."""
        def on_unit(u, b, h, c):
            n = units.ordinal(u)
            for w in range(COMPUTE_WGS):
                i = self.index(n, w)
                pl.when(n >= 2)(lambda: plgpu.barrier_wait(self.free.at[i]))
                rows = pl.ds((c * COMPUTE_WGS + w) * ROWS, ROWS)
                for src, buf, ready in zip(srcs, self.buffers, self.ready):
                    plgpu.copy_gmem_to_smem(src.at[b, h, rows], buf.at[i], ready.at[i])

        return on_unit

    def wait(self, units: Units, u, wg):
        """A compute warpgroup's set for unit u, once its copies landed."""
        i = self.index(units.ordinal(u), wg)
        for ready in self.ready:
            plgpu.barrier_wait(ready.at[i])
        return i

    def drain(self, units: Units):
        """The memory warpgroup, at the end: observe the last releases, so that every phase has
        been waited on before the barriers go out of scope (as in `Ring.stream`)."""
        count = units.count()

        @pl.loop(jnp.maximum(0, count - 2), count)
        def _(n):
            for w in range(COMPUTE_WGS):
                plgpu.barrier_wait(self.free.at[self.index(n, w)])


def _kernel(off_ref, units: Units, q_ref, k_ref, v_ref, o_ref, lse_ref, smem, barriers, *,
            rule: MaskRule, scale2: float, lay: Launch, cfg: MosaicFlashConfig, o_in_q: bool):
    """A persistent CTA of the forward (see `Units` and `Ring`): the memory warpgroup prefetches
    the next unit's blocks while the compute warpgroups finish the current one. ``o_in_q``: the
    output leaves through the unit's Q buffer (``o_smem`` is ``q_smem``).

    A unit's plan row holds the union [lo, hi) of KV steps, then per warpgroup its
    (lo, flo, fhi, hi) (`common.bounded_ranges`); in table mode (one plan per head) it holds
    (0, count) and (0, 0, 0, count)."""
    q_smem, o_smem, k_smem, v_smem, lse_smem, p_smem = smem
    q_bar, k_ready, v_ready, k_free, v_free, sched, q_free = barriers
    prefetched = RowBuffers((q_smem,), (q_bar,), q_free) if cfg.prefetch_q else None
    bk = cfg.block_k
    ring = Ring((k_smem, v_smem), (k_ready, v_ready), (k_free, v_free), cfg.num_stages)
    wg = lax.axis_index("wg")

    def rendezvous():
        # Both compute warpgroups meet here. One meeting per step half and an extra one at each
        # unit's start (warpgroup 1) and end (warpgroup 0) keep them half a step apart: one
        # issues its products while the other runs its softmax.
        if cfg.pingpong:
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")

        @units.loop(init_carry=jnp.int32(0))
        def _(u, done):  # done: KV steps of this CTA's earlier units
            b, h, c, plan, block_of = units.unit(u)
            u_lo, u_hi = plan[0], plan[1]
            tile = c * COMPUTE_WGS + wg
            row0 = tile * ROWS
            first = off_ref[b] + tile * lay.block_q
            if prefetched is not None:
                qi = prefetched.wait(units, u, wg)
                if o_in_q:
                    # The previous unit's output left through its Q buffer: once its store has
                    # read it, the memory warpgroup may load the unit after next there.
                    n = units.ordinal(u)

                    @pl.when(n > 0)
                    def _():
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        plgpu.barrier_arrive(q_free.at[RowBuffers.index(n - 1, wg)])
            else:
                qi = wg
                plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(row0, ROWS)], q_smem.at[wg],
                                        q_bar.at[wg])
                plgpu.barrier_wait(q_bar.at[qi])
            q = q_smem.at[qi]
            pl.when(wg == 1)(rendezvous)
            lo, flo, fhi, hi = (plan[2 + 4 * wg + i] for i in range(4))
            slot_at = lambda step: ring.slot(done + step - u_lo)

            def skip(step, carry):
                ring.skip(slot_at(step))
                rendezvous()
                rendezvous()
                return carry

            def visit(step, carry, masked: bool):
                acc, m, l = carry  # [ROWS, Dv] f32, [ROWS], [ROWS]; m in log2 units
                slot = slot_at(step)
                plgpu.barrier_wait(k_ready.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q, k_smem.at[slot].transpose((1, 0)))
                    rendezvous()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))  # [ROWS, BK]
                plgpu.barrier_arrive(k_free.at[slot])
                s = s * scale2
                if masked:
                    ok = visible(rule, first, block_of(step) * bk, lay.G_p.bit_length() - 1,
                                 (ROWS, bk))
                    s = jnp.where(ok, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m - m_safe)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                p = p.astype(q_ref.dtype)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                if cfg.pingpong:
                    plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_ready.at[slot])
                if cfg.pingpong:
                    plgpu.barrier_wait(sched)

                if p_smem is not None:
                    # The interpreter's wgmma reads operands from SMEM only.
                    p_smem.at[wg][...] = p
                    plgpu.commit_smem()
                    p = p_smem.at[wg]

                if p_smem is None:
                    acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p, v_smem.at[slot]))(
                        plgpu.ACC.init(acc))
                else:
                    # The interpreter cannot run `run_state`: a fresh accumulator, then an add.
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, lay.Dv_p), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            acc = plgpu.layout_cast(jnp.zeros((ROWS, lay.Dv_p), jnp.float32), plgpu.Layout.WGMMA)
            carry = (acc, _row_vector(-jnp.inf), _row_vector(0.0))
            lax.fori_loop(u_lo, lo, skip, None)
            carry = lax.fori_loop(lo, flo, functools.partial(visit, masked=True), carry)
            carry = lax.fori_loop(flo, fhi, functools.partial(visit, masked=False), carry)
            acc, m, l = lax.fori_loop(fhi, hi, functools.partial(visit, masked=True), carry)
            lax.fori_loop(hi, u_hi, skip, None)
            pl.when(wg == 0)(rendezvous)
            if prefetched is not None and not o_in_q:
                plgpu.barrier_arrive(q_free.at[qi])
                # The previous unit's stores must have read the output buffers.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            has_key = l > 0.0
            l_safe = jnp.where(has_key, l, 1.0)
            # With ``o_in_q`` the output reuses Q's buffer: every product reading Q has completed.
            o_out = o_smem.at[qi if o_in_q else wg]
            o_out[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(o_smem.dtype)
            lse_smem.at[wg][...] = jnp.where(has_key, m * LN2 + jnp.log(l_safe), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_out, o_ref.at[b, h, pl.ds(row0, ROWS)])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, ROWS)])
            if prefetched is None:
                # The next unit overwrites these buffers.
                plgpu.wait_smem_to_gmem(0)
            return done + u_hi - u_lo

        if prefetched is not None:
            plgpu.wait_smem_to_gmem(0)
            if o_in_q:
                count = units.count()
                pl.when(count > 0)(lambda: plgpu.barrier_arrive(
                    q_free.at[RowBuffers.index(count - 1, wg)]))

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        ring.stream(units, (k_ref, v_ref),
                    lambda step, block_of: pl.ds(block_of(step) * bk, bk),
                    on_unit=None if prefetched is None else prefetched.load(units, (q_ref,)))
        if prefetched is not None:
            prefetched.drain(units)


def walk_plan(rule: MaskRule, lay: Launch, offsets, blocks: BlockTable | None):
    """int32 [B, 1 or H, n_cta, 10]: see `_kernel`."""
    n_cta = lay.T_p // (COMPUTE_WGS * lay.block_q)
    if blocks is not None:
        cta_row = (jnp.arange(n_cta) * COMPUTE_WGS * lay.block_q) // blocks.q_tile
        count = blocks.counts[:, :, cta_row]  # [B, H, n_cta]
        z = jnp.zeros_like(count)
        return jnp.stack([z, count, z, z, z, count, z, z, z, count], axis=-1).astype(jnp.int32)
    first = offsets[:, None] + jnp.arange(n_cta * COMPUTE_WGS) * lay.block_q  # [B, tiles]
    lo, hi, flo, fhi = (jnp.broadcast_to(x, first.shape) for x in bounded_ranges(
        rule, first, first + lay.block_q - 1, lay.block_k))
    per_wg = jnp.stack([lo, flo, fhi, hi], axis=-1).reshape(lay.B, 1, n_cta, COMPUTE_WGS * 4)
    u_lo = jnp.min(lo.reshape(lay.B, 1, n_cta, COMPUTE_WGS), axis=-1, keepdims=True)
    u_hi = jnp.max(hi.reshape(lay.B, 1, n_cta, COMPUTE_WGS), axis=-1, keepdims=True)
    return jnp.concatenate([u_lo, u_hi, per_wg], axis=-1).astype(jnp.int32)


def flash_forward(q, k, v, offsets, *, rule: MaskRule, scale: float, config: MosaicFlashConfig,
                  blocks: BlockTable | None = None,
                  interpret: bool | plgpu.InterpretGPUParams = False):
    """Grouped flash attention over a block list or a block range (the contract of
    `kernels.triton.flash_fwd.flash_forward`, without packed bounds).

    Args:
      q: [B, T, HQ, D]; k: [B, N, H, D]; v: [B, N, H, Dv]; bfloat16 or float16, one dtype.
      offsets: int32[B], key position of query 0.
      rule, scale: the token mask rule and the softmax scale.
      config: tiling; ``config.block_k`` is the KV block the table ids refer to.
      blocks: optional KV blocks per query tile; ``blocks.q_tile`` must be a multiple of the
        queries of one CTA (``2 * 64 // G_p``).
      interpret: run under the Mosaic GPU interpreter (CPU); True, or its parameters
        (`plgpu.InterpretGPUParams`, e.g. with ``detect_races=True``).

    Returns:
      o [B, T, HQ, Dv] in q.dtype and lse [B, T, HQ] float32 (-inf for rows without a key).
    """
    if k.shape[1] == 0 or q.shape[1] == 0:
        return no_keys(q, v)
    lay = launch(q, k, v, config.block_k)
    check_table(blocks, lay)
    n_cta = lay.T_p // (COMPUTE_WGS * lay.block_q)
    dtype = q.dtype
    stages, bk = config.num_stages, config.block_k

    smem_2d = lambda lead, rows, width: swizzled((lead, rows, width), dtype)

    n_units = n_cta * lay.H * lay.B
    # Under the interpreter a few CTAs, so that each runs several units as on a GPU.
    num_ctas = min(n_units, config.num_ctas or (3 if interpret else multiprocessors()))
    q_buffers = COMPUTE_WGS * (2 if config.prefetch_q else 1)
    smem = [smem_2d(q_buffers, ROWS, lay.D_p), smem_2d(COMPUTE_WGS, ROWS, lay.Dv_p),
            smem_2d(stages, bk, lay.D_p), smem_2d(stages, bk, lay.Dv_p),
            plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32)]
    # Q and O share buffers without prefetch, and with it where O's own would not fit.
    shared_qo = lay.D_p == lay.Dv_p and (
        not config.prefetch_q or smem_bytes(smem) + SMEM_SLACK > SMEM_BYTES)
    if shared_qo:
        smem[1] = None
    smem = tuple(smem)
    check_smem(smem, config, lay.D_p, lay.Dv_p)
    # The interpreter's wgmma takes P from shared memory.
    smem = (*smem, smem_2d(COMPUTE_WGS, ROWS, bk) if interpret else None)

    def body(off_ref, plan_ref, tab_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        barriers = (plgpu.Barrier(num_barriers=q_buffers),
                    plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
                    plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=COMPUTE_WGS),
                    plgpu.Barrier(num_barriers=q_buffers) if config.prefetch_q else None)

        units = Units(lay, n_cta, rule.causal, num_ctas, plan_ref,
                      table_steps(tab_ref, blocks, lay))

        def run(smem, bars):
            q_smem, o_smem, *rest = smem
            _kernel(off_ref, units, q_ref, k_ref, v_ref, o_ref, lse_ref,
                    (q_smem, q_smem if o_smem is None else o_smem, *rest), bars,
                    rule=rule, scale2=scale * LOG2E, lay=lay, cfg=config,
                    o_in_q=config.prefetch_q and shared_qo)

        pl.run_scoped(run, smem, barriers, collective_axes="wg")

    entry, table_args = with_table(body, None if blocks is None else blocks.table)
    o, lse = persistent_kernel(
        entry, out_type=(lay.rows_shape(dtype, lay.Dv_p), lay.rows_shape(jnp.float32)),
        num_ctas=num_ctas, interpret=interpret, name="nsa_mosaic_flash_fwd",
    )(offsets.astype(jnp.int32), walk_plan(rule, lay, offsets, blocks), *table_args,
      lay.group(q, lay.D_p), lay.heads_major(k, lay.D_p), lay.heads_major(v, lay.Dv_p))
    return lay.ungroup(o, v.shape[3]), lay.ungroup_vector(lse)
