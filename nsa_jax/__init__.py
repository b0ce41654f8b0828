"""Native Sparse Attention for JAX: compressed, selected and sliding-window attention, gated.

Importing the package loads nothing heavy: each public name (and jax with it) loads on first use,
so ``nsa-jax --help`` answers at once; backends (`nsa_jax.ops`) load when first called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "compressed_attention": "nsa_jax.api",
    "gate_and_combine": "nsa_jax.api",
    "nsa_attention": "nsa_jax.api",
    "select_blocks": "nsa_jax.api",
    "selected_attention": "nsa_jax.api",
    "sliding_window_attention": "nsa_jax.api",
    "compress": "nsa_jax.compression",
    "NSAConfig": "nsa_jax.config",
    "BlockSparseIndices": "nsa_jax.metadata",
    "ReverseBlockMap": "nsa_jax.metadata",
    "reblock": "nsa_jax.metadata",
    "reverse_map": "nsa_jax.metadata",
    "NSAAttention": "nsa_jax.module",
    "MeshAxes": "nsa_jax.parallel",
    "zigzag": "nsa_jax.parallel",
    "unzigzag": "nsa_jax.parallel",
    "NSACache": "nsa_jax.decode",
    "init_cache": "nsa_jax.decode",
    "nsa_decode": "nsa_jax.decode",
    "segment_ids_from_cu_seqlens": "nsa_jax.segments",
    "Tiling": "nsa_jax.kernels.triton.tiling",
    "TritonTilings": "nsa_jax.kernels.triton.tiling",
    "default_tilings": "nsa_jax.kernels.triton.tiling",
    "XlaTilings": "nsa_jax.ops.xla",
    "MosaicFlashConfig": "nsa_jax.kernels.mosaic_gpu.flash_fwd",
    "MosaicScoringConfig": "nsa_jax.kernels.mosaic_gpu.block_scores",
    "MosaicTilings": "nsa_jax.kernels.mosaic_gpu.tiling",
}
_RENAMED = {"init_compress_params": ("nsa_jax.compression", "init_params")}
_SUBMODULES = ("reference",)

if TYPE_CHECKING:
    from nsa_jax import reference
    from nsa_jax.api import (compressed_attention, gate_and_combine, nsa_attention,
                             select_blocks, selected_attention, sliding_window_attention)
    from nsa_jax.compression import compress
    from nsa_jax.compression import init_params as init_compress_params
    from nsa_jax.config import NSAConfig
    from nsa_jax.decode import NSACache, init_cache, nsa_decode
    from nsa_jax.kernels.mosaic_gpu.block_scores import MosaicScoringConfig
    from nsa_jax.kernels.mosaic_gpu.flash_fwd import MosaicFlashConfig
    from nsa_jax.kernels.mosaic_gpu.tiling import MosaicTilings
    from nsa_jax.kernels.triton.tiling import Tiling, TritonTilings, default_tilings
    from nsa_jax.metadata import BlockSparseIndices, ReverseBlockMap, reblock, reverse_map
    from nsa_jax.module import NSAAttention
    from nsa_jax.ops.xla import XlaTilings
    from nsa_jax.parallel import MeshAxes, unzigzag, zigzag
    from nsa_jax.segments import segment_ids_from_cu_seqlens


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f"nsa_jax.{name}")
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _RENAMED:
        module, attr = _RENAMED[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'nsa_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "BlockSparseIndices", "MeshAxes", "MosaicFlashConfig", "MosaicScoringConfig", "MosaicTilings",
    "NSAAttention", "NSACache", "NSAConfig", "ReverseBlockMap", "Tiling", "TritonTilings",
    "XlaTilings", "compress", "compressed_attention", "default_tilings", "gate_and_combine",
    "init_cache", "init_compress_params", "nsa_attention", "nsa_decode", "reblock", "reference",
    "reverse_map", "segment_ids_from_cu_seqlens", "select_blocks", "selected_attention",
    "sliding_window_attention", "unzigzag", "zigzag",
]
