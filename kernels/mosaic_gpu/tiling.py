"""Frozen, validated tilings of the "mosaic" implementation.

Its forward branches run the Mosaic GPU kernels (`MosaicFlashConfig` each); block scoring and
every backward pass still run the Triton-lowered kernels, tiled by ``triton``.
"""

from __future__ import annotations

import dataclasses

from nsa_jax.kernels.mosaic_gpu.flash_fwd import MosaicFlashConfig
from nsa_jax.kernels.triton.tiling import SM90, TritonTilings


@dataclasses.dataclass(frozen=True, kw_only=True)
class MosaicTilings:
    """One `MosaicFlashConfig` per forward branch, and the `TritonTilings` of the rest."""

    compressed: MosaicFlashConfig = MosaicFlashConfig()
    selected: MosaicFlashConfig = MosaicFlashConfig()
    window: MosaicFlashConfig = MosaicFlashConfig()
    triton: TritonTilings = SM90

    def __post_init__(self):
        for name in ("compressed", "selected", "window"):
            value = getattr(self, name)
            if not isinstance(value, MosaicFlashConfig):
                raise TypeError(f"MosaicTilings.{name} must be a MosaicFlashConfig, got "
                                f"{type(value).__name__}")
        if not isinstance(self.triton, TritonTilings):
            raise TypeError(f"MosaicTilings.triton must be a TritonTilings, got "
                            f"{type(self.triton).__name__}")
