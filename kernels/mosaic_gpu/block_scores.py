"""Block scoring's compressed mass on Hopper, in Pallas Mosaic GPU.

Same contract as `kernels/triton/block_scores.compressed_mass`: given the compressed branch's
log-sum-exp, recompute the probabilities of each CTA's rows (queries times the G_p heads of one
KV head) against the compressed tokens and sum them over those rows.

The sum runs over rows, so the products are taken transposed: each wgmma multiplies one block of
64 compressed tokens (M) by the CTA's rows (N, up to 256), giving scores [BK, R] whose row sums
are the wanted column sums of the forward's [R, BK] probabilities. A row sum stays inside a
thread quad; a column sum of the forward's layout would cross warps through shared memory.

- A CTA runs three warpgroups. The memory warpgroup loads each work unit's rows of Q and lse into
  one of two buffers (so the next unit's rows arrive while the current one runs) and streams the
  unit's compressed-key blocks through a ring of SMEM slots with TMA.
- The two compute warpgroups share the rows and take the blocks in turn (block i of the CTA's
  stream goes to warpgroup i % 2), so one's softmax overlaps the other's product with no
  scheduling barrier. Each writes its block's 64 sums straight to the output with TMA.
- The KV blocks a unit walks, and the part of them its rows see whole (no mask), come from XLA
  (`common.bounded_ranges`); the output of blocks outside a unit's range is left unwritten and
  cleared by the XLA reduction that sums a selection tile's CTAs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nsa_jax.kernels.common import LOG2E, Launch, MaskRule, bounded_ranges, pow2
from nsa_jax.kernels.mosaic_gpu.flash_fwd import (CHANNELS, COMPUTE_WGS, multiprocessors,
                                                  persistent_kernel, round_up, swizzled, visible)

BLOCK_K = 64  # compressed tokens per block: wgmma's M


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicScoringConfig:
    """Tiling of the Mosaic GPU compressed-mass kernel; not semantics.

    Attributes:
      rows: query rows (queries times G_p heads) per CTA, the N of each product: 64, 128 or
        256; lowered to the rows of one selection tile when a tile has fewer.
      num_stages: key blocks in flight (SMEM ring slots); even, so that each compute warpgroup
        always finds its blocks in the same slots.
      num_ctas: persistent CTAs; None: one per multiprocessor.
    """

    rows: int = 256
    num_stages: int = 4
    num_ctas: int | None = None

    def __post_init__(self):
        if self.rows not in (64, 128, 256):
            raise ValueError(f"MosaicScoringConfig.rows={self.rows!r} must be 64, 128 or 256")
        if not isinstance(self.num_stages, int) or self.num_stages < 2 or self.num_stages % 2:
            raise ValueError(f"MosaicScoringConfig.num_stages={self.num_stages!r} must be an "
                             "even int >= 2")
        if self.num_ctas is not None and (not isinstance(self.num_ctas, int)
                                          or self.num_ctas < 1):
            raise ValueError(
                f"MosaicScoringConfig.num_ctas={self.num_ctas!r} must be a positive int or None")


def cta_queries(G: int, q_tile: int, config: MosaicScoringConfig) -> int:
    """Queries per CTA: as many as ``config.rows`` allow, dividing the selection tile."""
    return max(1, min(config.rows // pow2(G), q_tile & -q_tile))


def serves(G: int, q_tile: int, config: MosaicScoringConfig) -> bool:
    """Whether a CTA gets 64 to 256 rows. Fewer (small groups with short or odd selection tiles)
    would still be correct but leave the matrix units mostly idle, and were never measured
    against the Triton kernel."""
    return 64 <= cta_queries(G, q_tile, config) * pow2(G) <= 256


def _kernel(off_ref, plan_ref, q_ref, lse_ref, k_ref, out_ref, smem, barriers, *,
            rule: MaskRule, scale2: float, lay: Launch, R: int, n_cta: int, stages: int,
            num_ctas: int):
    """A persistent CTA: it takes work units (b, h, c) — CTA c of KV head h of row b —
    ``num_ctas`` apart; the key blocks of all its units form one stream, so the ring runs on
    from unit to unit.

    ``plan_ref`` int32 [B, n_cta, 4]: the unit's (lo, flo, fhi, hi) (`common.bounded_ranges`).
    """
    q_smem, lse_smem, k_smem, o_smem = smem
    q_ready, l_ready, q_free, k_ready, k_free = barriers
    n_units = n_cta * lay.H * lay.B
    queries = R // lay.G_p
    wg = lax.axis_index("wg")
    first_unit = lax.axis_index("cta")

    def unit(u):
        """(b, h, c) of work unit u; under a causal rule the CTAs that see most keys go first."""
        c, hb = lax.div(u, jnp.int32(lay.H * lay.B)), lax.rem(u, jnp.int32(lay.H * lay.B))
        h, b = lax.div(hb, jnp.int32(lay.B)), lax.rem(hb, jnp.int32(lay.B))
        if rule.causal:
            c = n_cta - 1 - c
        return b, h, c

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")

        @pl.loop(first_unit, n_units, step=num_ctas, init_carry=(jnp.int32(0), jnp.int32(0)))
        def _(u, carry):
            done, n = carry  # key blocks of this CTA's earlier units, and how many units
            b, h, c = unit(u)
            lo, flo, fhi, hi = (plan_ref[b, c, i] for i in range(4))
            first = off_ref[b] + c * queries
            buf = lax.rem(n, jnp.int32(2))
            plgpu.barrier_wait(q_ready.at[buf])
            plgpu.barrier_wait(l_ready.at[buf])
            q = q_smem.at[buf]
            lse2 = plgpu.load(lse_smem.at[buf], layout=plgpu.Layout.WGMMA.reduce(0)) * LOG2E

            def visit(step, masked: bool):
                i = done + step - lo
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(k_ready.at[slot])

                def kq(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem.at[slot], q.transpose((1, 0)))
                    return acc_ref[...]

                s = pl.run_scoped(kq, plgpu.ACC((BLOCK_K, R), jnp.float32))  # [BK, R]
                plgpu.barrier_arrive(k_free.at[slot])
                # Rows that must not count carry lse = +inf: their probabilities are 0.
                p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse2, s.shape, [1]))
                if masked:
                    ok = visible(rule, first, step * BLOCK_K, lay.G_p.bit_length() - 1,
                                 (BLOCK_K, R), key_axis=0)
                    p = jnp.where(ok, p, 0.0)
                out = o_smem.at[wg, lax.rem(lax.div(i, jnp.int32(2)), jnp.int32(2))]
                # The store issued from this buffer two blocks ago must have read it.
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                out[...] = p.sum(axis=1)  # [BK]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out, out_ref.at[b, h, c, pl.ds(step * BLOCK_K, BLOCK_K)])

            def walk(start, stop, masked: bool):
                # This warpgroup's blocks: stream index done + step - lo of its parity.
                mine = start + lax.rem(done + start - lo + wg, jnp.int32(2))
                pl.loop(mine, stop, step=2)(lambda step: visit(step, masked))

            walk(lo, flo, True)
            walk(flo, fhi, False)
            walk(fhi, hi, True)
            plgpu.barrier_arrive(q_free.at[buf])
            return done + hi - lo, n + 1

        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        @pl.loop(first_unit, n_units, step=num_ctas, init_carry=(jnp.int32(0), jnp.int32(0)))
        def issued(u, carry):
            done, n = carry
            b, h, c = unit(u)
            lo, hi = plan_ref[b, c, 0], plan_ref[b, c, 3]
            buf = lax.rem(n, jnp.int32(2))

            @pl.when(n >= 2)
            def _():
                plgpu.barrier_wait(q_free.at[buf])

            rows = pl.ds(c * R, R)
            plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], q_smem.at[buf], q_ready.at[buf])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[buf], l_ready.at[buf])

            @pl.loop(lo, hi)
            def _(step):
                i = done + step - lo
                slot = lax.rem(i, jnp.int32(stages))

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                plgpu.copy_gmem_to_smem(k_ref.at[b, h, pl.ds(step * BLOCK_K, BLOCK_K)],
                                        k_smem.at[slot], k_ready.at[slot])

            return done + hi - lo, n + 1

        # Observe the last releases too, so that every phase of every barrier has been waited on
        # before the barriers go out of scope (the interpreter checks this).
        blocks, units = issued

        @pl.loop(jnp.maximum(0, blocks - stages), blocks)
        def _(i):
            plgpu.barrier_wait(k_free.at[lax.rem(i, jnp.int32(stages))])

        @pl.loop(jnp.maximum(0, units - 2), units)
        def _(n):
            plgpu.barrier_wait(q_free.at[lax.rem(n, jnp.int32(2))])


def _plan(rule: MaskRule, offsets, T: int, n_cta: int, queries: int):
    """int32 [B, n_cta, 4]: each CTA's (lo, flo, fhi, hi) of key blocks; empty for CTAs wholly
    past the T real queries (padding to whole selection tiles), whose sums would be 0."""
    start = jnp.arange(n_cta, dtype=jnp.int32) * queries
    first = offsets[:, None] + start  # [B, n_cta]
    lo, hi, flo, fhi = (jnp.broadcast_to(x, first.shape) for x in bounded_ranges(
        rule, first, first + queries - 1, BLOCK_K))
    hi = jnp.where(start < T, hi, lo)
    flo, fhi = jnp.minimum(flo, hi), jnp.minimum(fhi, hi)
    return jnp.stack([lo, flo, fhi, hi], axis=-1).astype(jnp.int32)


def compressed_mass(q, k_c, lse, offsets, *, rule: MaskRule, scale: float, q_tile: int,
                    config: MosaicScoringConfig, bounds=None,
                    interpret: bool | plgpu.InterpretGPUParams = False):
    """Compressed probability mass per selection tile, summed over the tile's queries and G heads
    (the contract of `kernels.triton.block_scores.compressed_mass`, without packed bounds).

    Args:
      q: [B, T, HQ, D]; k_c: [B, N_c, H, D], bfloat16 or float16, one dtype; lse: [B, T, HQ]
        float32 from the compressed branch.
      offsets: int32[B], key position of query 0.
      rule: visibility of compressed tokens (stride d, offset l - 1).
      scale: the softmax scale.
      q_tile: queries per selection tile; `serves` must hold.
      config: tiling; one that does not fit in shared memory fails to compile with a
        ValueError saying by how much.
      bounds: must be None (packed rows run the Triton kernel).
      interpret: run under the Mosaic GPU interpreter (CPU); True, or its parameters.

    Returns:
      float32 [B, H, ceil(T / q_tile), N_c].
    """
    if bounds is not None:
        raise NotImplementedError("the Mosaic GPU scoring kernel takes no packed rows")
    B, T, HQ, _ = q.shape
    N_c, H = k_c.shape[1], k_c.shape[2]
    n_tiles = -(-T // q_tile)
    if N_c == 0 or T == 0:
        return jnp.zeros((B, H, n_tiles, N_c), jnp.float32)
    G = HQ // H
    if not serves(G, q_tile, config):
        raise ValueError(f"the Mosaic GPU scoring kernel needs 64 to 256 rows per CTA; G={G} "
                         f"and q_tile={q_tile} give {cta_queries(G, q_tile, config) * pow2(G)}")
    queries = cta_queries(G, q_tile, config)
    lay = Launch.of(q, k_c, block_q=queries, block_k=BLOCK_K, q_unit=q_tile)
    lay = dataclasses.replace(lay, G_p=pow2(G), D_p=round_up(lay.D, CHANNELS))
    R = queries * lay.G_p
    n_cta = lay.T_p // queries
    n_units = n_cta * H * B
    num_ctas = min(n_units, config.num_ctas or (3 if interpret else multiprocessors()))
    stages = config.num_stages
    dtype = q.dtype

    smem_2d = lambda lead, rows: swizzled((lead, rows, lay.D_p), dtype)

    def body(off_ref, plan_ref, q_ref, lse_ref, k_ref, out_ref):
        smem = (smem_2d(2, R), plgpu.SMEM((2, R), jnp.float32), smem_2d(stages, BLOCK_K),
                plgpu.SMEM((COMPUTE_WGS, 2, BLOCK_K), jnp.float32))
        barriers = (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
                    plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2),
                    plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages))
        pl.run_scoped(
            lambda smem, bars: _kernel(off_ref, plan_ref, q_ref, lse_ref, k_ref, out_ref, smem,
                                       bars, rule=rule, scale2=scale * LOG2E, lay=lay, R=R,
                                       n_cta=n_cta, stages=stages, num_ctas=num_ctas),
            smem, barriers, collective_axes="wg")

    offsets = offsets.astype(jnp.int32)
    plan = _plan(rule, offsets, T, n_cta, queries)
    parts = persistent_kernel(
        body, out_type=jax.ShapeDtypeStruct((B, H, n_cta, lay.N_p), jnp.float32),
        num_ctas=num_ctas, interpret=interpret, name="nsa_mosaic_compressed_mass",
    )(offsets, plan, lay.group(q, lay.D_p), lay.group_lse(lse), lay.heads_major(k_c, lay.D_p))
    # Blocks outside a CTA's range were never written.
    blk = jnp.arange(lay.N_p, dtype=jnp.int32) // BLOCK_K
    seen = (blk >= plan[:, None, :, 0:1]) & (blk < plan[:, None, :, 3:4])  # [B, 1, n_cta, N_p]
    parts = jnp.where(seen, parts, 0.0)
    mass = parts.reshape(B, H, n_tiles, q_tile // queries, lay.N_p).sum(axis=3)
    return mass[..., :N_c]
