"""Frozen, validated tilings of the "mosaic" implementation.

Its forward branches run the Mosaic GPU flash kernel (`MosaicFlashConfig` each), tiled block
scoring the Mosaic GPU compressed-mass kernel (`MosaicScoringConfig`), and the compressed and
window backward the Mosaic GPU dQ and dK/dV kernels, the selected branch's dQ the Mosaic GPU
table walk (its dK/dV there is opt-in: ``selected_dkv``); the rest and the calls those kernels do
not serve run the Triton-lowered kernels, tiled by ``triton``.
"""

from __future__ import annotations

import dataclasses

from nsa_jax.kernels.common import pow2
from nsa_jax.kernels.mosaic_gpu.block_scores import MosaicScoringConfig
from nsa_jax.kernels.mosaic_gpu.flash_fwd import MosaicFlashConfig
from nsa_jax.kernels.triton.tiling import SM90, TritonTilings


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicTilings:
    """One `MosaicFlashConfig` per forward branch (``selected=None``: that branch runs the
    Triton forward), the scoring kernel's `MosaicScoringConfig` (None: Triton scores; groups of
    up to 4 heads take ``scoring_small_groups`` where it is set), those of
    the compressed and window branches' dQ and dK/dV kernels (None: Triton's), and the
    `TritonTilings` of the kernels this backend takes from "triton"."""

    # H200, T=65536, HQ=64, H=4, bf16 forward (ms), block_k/num_stages, before ping-pong:
    # compressed 10.17 at 128/2 against 11.16-11.27 at 64/2-4 (128/3 exceeds shared memory);
    # selected (tiles of 64 queries) 7.49 at 64/3, 7.60 at 64/2, 7.52 at 64/4; window 4.78 at
    # 64/3, 4.80 at 64/2, 5.04 at 128/2. Then, at these block sizes, with / without ping-pong:
    # compressed 9.35 / 9.74, selected 7.16 / 7.19, window 4.80 / 4.51.
    # Without Q prefetch the selected branch's forward was behind Triton's (6.98 ms there against
    # 7.16 at its best here, and behind at every length of the 8k-128k table).
    # Scoring (the compressed-mass kernel alone, select_q_tile=64), 64k / 128k, HQ64/H4 (ms):
    # rows=256 4 stages 5.12 / 18.2, 2 stages 5.52 / 19.4; rows=128 6.20 / 22.6 (4 stages) and
    # 6.63 / 23.8 (2); 6 stages at 256 rows exceed shared memory. Ping-pong meetings between
    # the compute warpgroups (as in the flash kernel) made 256/4 slower: 5.39 / 19.3. Triton's
    # kernel: 8.19 / 29.2. HQ32/H8 ranks the same.
    # With `prefetch_q` (H200, 2026-12-03, 64k): 8.90 / 4.58 ms against 9.20 / 4.76 without
    # (HQ64/H4 and HQ32/H8); 64/3 with prefetch 10.22 / 5.43.
    compressed: MosaicFlashConfig = MosaicFlashConfig(block_k=128, num_stages=2, prefetch_q=True)
    # With `prefetch_q` (H200, 2026-12-03, 64k, ms, HQ64/H4 and HQ32/H8): selected at 64/2 with
    # ping-pong 6.66 / 3.84 against Triton's 6.88 / 4.10 (7.09 / 3.98 without prefetch, 6.72 /
    # 3.86 at 3 stages); window at 64/2 4.29 / 2.53 against 4.49 / 2.81 at the earlier 64/3
    # without prefetch (64/3 with it: 4.48 / 2.47; with ping-pong too: 4.34 / 2.50).
    selected: MosaicFlashConfig | None = MosaicFlashConfig(block_k=64, num_stages=2,
                                                           pingpong=True, prefetch_q=True)
    window: MosaicFlashConfig = MosaicFlashConfig(block_k=64, num_stages=2, pingpong=False,
                                                  prefetch_q=True)
    scoring: MosaicScoringConfig | None = MosaicScoringConfig()
    # Groups of at most 4 heads (padded), where a CTA's rows hold a whole 64-query tile: 2
    # stages took 2.64, 2.72 and 2.83 ms against 4 stages' 2.89, 3.05 and 2.88 in three leases
    # (HQ32/H8, 64k; G = 1 and 2 not timed). At HQ64/H4, 4 stages won twice (5.14 / 5.51, 5.10 /
    # 5.22 ms) and lost once (5.60 / 5.29).
    # None: ``scoring`` serves these groups too; not used when ``scoring`` is None.
    scoring_small_groups: MosaicScoringConfig | None = MosaicScoringConfig(num_stages=2)
    # The Mosaic GPU dQ and dK/dV kernels of the compressed and window backward (`flash_bwd.py`;
    # dK/dV takes block_k=64; None runs the Triton one). H200, T=65536, bf16, 2 stages each,
    # backward ms Triton / Mosaic dQ / Mosaic dK/dV / both: compressed 41.8 / 36.6 / 37.1 / 31.1
    # (HQ64/H4) and 20.1 / 18.4 / 18.3 / 15.8 (HQ32/H8); window 12.9 / 12.1 / 11.3 / 10.5 and
    # 7.2 / 6.2 / 6.6 / 5.7.
    compressed_dq: MosaicFlashConfig | None = MosaicFlashConfig(block_k=64, num_stages=2)
    window_dq: MosaicFlashConfig | None = MosaicFlashConfig(block_k=64, num_stages=2)
    compressed_dkv: MosaicFlashConfig | None = MosaicFlashConfig(block_k=64, num_stages=2)
    window_dkv: MosaicFlashConfig | None = MosaicFlashConfig(block_k=64, num_stages=2)
    # The selected branch's dQ and dK/dV on the Mosaic GPU kernels (their table walks; dK/dV
    # takes block_k=64 and an even num_stages). Branch backward at 64k, ms, HQ64/H4 and HQ32/H8
    # (2026-12-03): Triton 24.4 / 13.6; Mosaic dQ at 64/3 20.8 / 11.8 (64/2 21.3 / 12.1);
    # Mosaic dK/dV 27.4 / 14.6, slower than Triton's (whose heavy-block shares run wider), so
    # it stays opt-in.
    selected_dq: MosaicFlashConfig | None = MosaicFlashConfig(block_k=64, num_stages=3)
    selected_dkv: MosaicFlashConfig | None = None
    triton: TritonTilings = SM90

    def scoring_for(self, G: int) -> MosaicScoringConfig | None:
        """The scoring tiling for groups of G query heads per KV head."""
        if self.scoring is not None and pow2(G) <= 4 and self.scoring_small_groups is not None:
            return self.scoring_small_groups
        return self.scoring

    def __post_init__(self):
        optional = ("selected", "compressed_dq", "window_dq", "compressed_dkv", "window_dkv",
                    "selected_dq", "selected_dkv")
        for name in ("compressed", "window", *optional):
            value = getattr(self, name)
            if not isinstance(value, MosaicFlashConfig) and not (name in optional
                                                                 and value is None):
                allowed = " or None" if name in optional else ""
                raise TypeError(f"MosaicTilings.{name} must be a MosaicFlashConfig{allowed}, got "
                                f"{type(value).__name__}")
        for name in ("compressed_dkv", "window_dkv", "selected_dkv"):
            value = getattr(self, name)
            if value is not None and value.block_k != 64:
                raise ValueError(f"MosaicTilings.{name}.block_k={value.block_k} must be 64 (the "
                                 "keys of one warpgroup of the dK/dV kernel)")
            if value is not None and value.prefetch_q:
                raise ValueError(f"MosaicTilings.{name}.prefetch_q=True: the dK/dV kernel has no "
                                 "such option (its rows stream through its ring)")
        if self.selected_dkv is not None and self.selected_dkv.num_stages % 2:
            raise ValueError(f"MosaicTilings.selected_dkv.num_stages="
                             f"{self.selected_dkv.num_stages} must be even (a table walk gives "
                             "each ring slot one warpgroup)")
        for name in ("scoring", "scoring_small_groups"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, MosaicScoringConfig):
                raise TypeError(f"MosaicTilings.{name} must be a MosaicScoringConfig or None, "
                                f"got {type(value).__name__}")
        if not isinstance(self.triton, TritonTilings):
            raise TypeError(f"MosaicTilings.triton must be a TritonTilings, got "
                            f"{type(self.triton).__name__}")
