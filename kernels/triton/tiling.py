"""Frozen, validated tilings of the Triton-lowered kernels, with a default per GPU generation.

A tiling is speed only, never semantics: every valid tiling gives the same results up to float
rounding order. `nsa-jax bench --tune` sweeps a few candidates per kernel on the GPU at hand and
prints the best as a `TritonTilings(...)` literal to pass as ``tilings=``.
"""

from __future__ import annotations

import dataclasses

import jax

from nsa_jax.kernels.common import check_launch_fields, compute_major, pow2
from nsa_jax.kernels.triton.flash_fwd import FlashConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tiling:
    """Tiling of one kernel.

    Attributes:
      rows: query rows per program, i.e. queries x (padded) group heads; a program owns
        ``rows // pow2(G)`` queries (at least one) of one KV head.
      block_k: keys (or compressed tokens) per KV block.
      num_warps, num_stages: Triton launch parameters.
    """

    rows: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_launch_fields(self, {"rows": 16, "block_k": 16, "num_warps": 1})

    def flash(self, G: int, *, q_tile: int | None = None, block_k_divides: int | None = None,
              queries: int | None = None) -> FlashConfig:
        """The kernel config for groups of G heads.

        ``q_tile``: block_q must divide it (block-list walks). ``block_k_divides``: block_k is
        lowered to the largest power of two dividing it (selection blocks); the result must stay
        >= 16. ``queries``: the call's T; block_q is lowered to cover no more than pow2(T) (a
        decode step's one query would otherwise share its program with padding rows).
        """
        bq = max(1, self.rows // pow2(G))
        if q_tile is not None:
            bq = min(bq, q_tile & -q_tile)
        if queries is not None:
            bq = min(bq, pow2(queries))
        bk = self.block_k
        if block_k_divides is not None:
            bk = min(bk, block_k_divides & -block_k_divides)
        return FlashConfig(block_q=bq, block_k=bk, num_warps=self.num_warps,
                           num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TritonTilings:
    """One `Tiling` per kernel of the "triton" implementation. With ``select_q_tile == 1`` the
    selected branch runs block-major for small groups (``selected_by_block`` and its ``_bwd``:
    rows = gathered queries x G) and query-major otherwise (``selected_per_token``: a program owns
    one query, its rows are the group's heads; backward ``selected_bwd``); ``selected`` tiles it
    for query tiles. ``scoring_per_token`` tiles the fused per-token selection kernel, ``scoring``
    the compressed-mass kernel of tiled selection, ``scored`` the compressed forward that also
    writes block sums (calls of a few queries: decode steps); ``*_bwd`` tile both backward
    kernels (dQ and dK/dV) of a branch."""

    compressed: Tiling = Tiling()
    selected: Tiling = Tiling()
    selected_per_token: Tiling = Tiling()
    selected_by_block: Tiling = Tiling()
    window: Tiling = Tiling()
    scoring: Tiling = Tiling()
    scoring_per_token: Tiling = Tiling()
    scored: Tiling = Tiling()
    compressed_bwd: Tiling = Tiling()
    selected_bwd: Tiling = Tiling()
    selected_by_block_bwd: Tiling = Tiling()
    window_bwd: Tiling = Tiling()

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, Tiling):
                raise TypeError(f"TritonTilings.{f.name} must be a Tiling, got {type(value).__name__}")


# Hopper (sm90): the best of `nsa-jax bench --tune` at T=32768, HQ=64, H=4 (benchmarks/RESULTS.md).
# With HQ=32, H=8 the same sweep preferred 64 rows for the window and selected kernels, by 2%.
SM90 = TritonTilings(
    compressed=Tiling(rows=128, block_k=64, num_warps=4, num_stages=2),
    selected=Tiling(rows=128, block_k=64, num_warps=4, num_stages=2),
    selected_per_token=Tiling(rows=16, block_k=64, num_warps=4, num_stages=2),
    # H200, T=65536, HQ=32/H=8: 64 rows (16 queries) 19.6 ms; 32 and 128 rows 20.5-21.3 ms at 4
    # warps, 256 rows 18.9 ms only with 8 warps (34 ms with 4).
    selected_by_block=Tiling(rows=64, block_k=64, num_warps=4, num_stages=2),
    window=Tiling(rows=128, block_k=64, num_warps=4, num_stages=2),
    scoring=Tiling(rows=128, block_k=64, num_warps=4, num_stages=2),
    # H200, T=65536, HQ=64/H=4 and HQ=32/H=8: 128 rows beat 64 by 2-5% and 32 by 2.3-2.6x;
    # 8 warps were 1.4-1.5x slower, 128-token chunks (at 64 rows) 5-9% slower.
    scoring_per_token=Tiling(rows=128, block_k=64, num_warps=4, num_stages=2),
    # H200, decode steps at B=32, HQ=64/H=4, 64k/128k (us a step): 2 stages 199/272, 3 187/258,
    # 4 180/268; 128-key blocks 196 (8 warps 217), 256 at 8 warps 396. A second lease at 64k: 2
    # stages 193, 3 178, 4 189, 5 197, 6 184 (steps vary by about 10 us between runs).
    scored=Tiling(rows=128, block_k=64, num_warps=4, num_stages=4),
    # Backward: `--tune --tune-length 16384` on an H100 80GB HBM3; 128 rows spill registers
    # (2x slower) and 8 warps with 3 stages exceed shared memory.
    compressed_bwd=Tiling(rows=64, block_k=64, num_warps=4, num_stages=3),
    selected_bwd=Tiling(rows=64, block_k=64, num_warps=4, num_stages=3),
    window_bwd=Tiling(rows=64, block_k=64, num_warps=4, num_stages=2),
    # H200, T=65536, HQ=32/H=8, forward+backward: 128 rows at 8 warps 41.4 ms; 64 rows at 4
    # warps 53.5, 32 rows 45.0, 128 rows at 4 warps 51.6.
    selected_by_block_bwd=Tiling(rows=128, block_k=64, num_warps=8, num_stages=2),
)
# Other generations (Ampere, Ada, ...): not measured here; small tiles that fit any of them.
GENERIC = TritonTilings()


def default_tilings(device=None) -> TritonTilings:
    """The default tilings for ``device`` (default: the first JAX device)."""
    device = jax.devices()[0] if device is None else device
    if compute_major(device) == "9":
        return SM90
    return GENERIC
