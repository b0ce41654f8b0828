"""`NSAConfig`: the semantic knobs of Native Sparse Attention (docs/design.md §2)."""

from __future__ import annotations

import dataclasses
import math

COMPRESS_METHODS = ("mean", "linear", "mlp")


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"NSAConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"NSAConfig.{name}={value} must be >= {minimum}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NSAConfig:
    """Semantics of one NSA layer; tiling lives in per-kernel configs, not here.

    Attributes:
      compress_block: keys summarised by one compressed token (paper's l).
      compress_stride: stride between compressed tokens (d); ``compress_block % compress_stride == 0``.
      select_block: selection block size (l'); a multiple of ``compress_stride``.
      num_selected: blocks each query (or query tile) attends to, forced ones included (n).
      num_initial: leading blocks that are always selected.
      num_local: blocks ending at the query's own block that are always selected.
      window: sliding-window size w; 0 disables the window branch.
      select_q_tile: queries that share one selection (1 = per token, as in the paper).
      causal: causal masking in every branch.
      scale: softmax scale; None means ``D ** -0.5``.
      compress_method: ``"mean"``, ``"linear"`` or ``"mlp"`` (phi of docs/design.md §3).
    """

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    num_selected: int = 16
    num_initial: int = 1
    num_local: int = 2
    window: int = 512
    select_q_tile: int = 1
    causal: bool = True
    scale: float | None = None
    compress_method: str = "mean"

    def __post_init__(self):
        _require_int("compress_block", self.compress_block, 1)
        _require_int("compress_stride", self.compress_stride, 1)
        _require_int("select_block", self.select_block, 1)
        _require_int("num_selected", self.num_selected, 1)
        _require_int("num_initial", self.num_initial, 0)
        _require_int("num_local", self.num_local, 0)
        _require_int("window", self.window, 0)
        _require_int("select_q_tile", self.select_q_tile, 1)
        if not isinstance(self.causal, bool):
            raise TypeError(f"NSAConfig.causal must be a bool, got {self.causal!r}")
        if self.compress_block % self.compress_stride:
            raise ValueError(
                f"NSAConfig.compress_block={self.compress_block} must be a multiple of "
                f"compress_stride={self.compress_stride}")
        if self.select_block % self.compress_stride:
            raise ValueError(
                f"NSAConfig.select_block={self.select_block} must be a multiple of "
                f"compress_stride={self.compress_stride}")
        if self.scale is not None:
            if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
                raise TypeError(f"NSAConfig.scale must be a float or None, got {self.scale!r}")
            if not (math.isfinite(self.scale) and self.scale > 0):
                raise ValueError(f"NSAConfig.scale={self.scale} must be a positive finite number")
        if self.compress_method not in COMPRESS_METHODS:
            raise ValueError(
                f"NSAConfig.compress_method={self.compress_method!r} must be one of {COMPRESS_METHODS}")
        if self.num_local >= 1:
            forced = self.num_initial + self.num_local - 1 + self.tile_blocks
            if forced > self.num_selected:
                raise ValueError(
                    f"forced blocks do not fit: num_initial={self.num_initial} + num_local="
                    f"{self.num_local} - 1 + ceil(select_q_tile={self.select_q_tile} / "
                    f"select_block={self.select_block}) = {forced} > num_selected={self.num_selected}")
        elif self.num_initial > self.num_selected:
            raise ValueError(
                f"num_initial={self.num_initial} must be <= num_selected={self.num_selected}")

    @property
    def tile_blocks(self) -> int:
        """Upper bound on the selection blocks one query tile overlaps when it is block-aligned."""
        return -(-self.select_q_tile // self.select_block)

    def softmax_scale(self, head_dim: int) -> float:
        return float(self.scale) if self.scale is not None else head_dim ** -0.5

    def num_compressed(self, kv_len: int) -> int:
        """N_c = max(0, (S - l) // d + 1)."""
        return max(0, (kv_len - self.compress_block) // self.compress_stride + 1)

    def num_select_blocks(self, kv_len: int) -> int:
        return -(-kv_len // self.select_block)
