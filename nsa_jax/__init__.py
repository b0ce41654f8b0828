"""Native Sparse Attention for JAX: compressed, selected and sliding-window attention, gated.

Importing the package loads no kernel: backends (`nsa_jax.ops`) and the tiling types load when
first used.
"""

import importlib

from nsa_jax import reference
from nsa_jax.api import (compressed_attention, gate_and_combine, nsa_attention, select_blocks,
                         selected_attention, sliding_window_attention)
from nsa_jax.compression import compress
from nsa_jax.compression import init_params as init_compress_params
from nsa_jax.config import NSAConfig
from nsa_jax.metadata import BlockSparseIndices, ReverseBlockMap, reblock, reverse_map
from nsa_jax.module import NSAAttention
from nsa_jax.segments import segment_ids_from_cu_seqlens

_LAZY = {
    "Tiling": "nsa_jax.kernels.triton.tiling",
    "TritonTilings": "nsa_jax.kernels.triton.tiling",
    "default_tilings": "nsa_jax.kernels.triton.tiling",
    "XlaTilings": "nsa_jax.ops.xla",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nsa_jax' has no attribute {name!r}")


__all__ = [
    "BlockSparseIndices", "NSAAttention", "NSAConfig", "ReverseBlockMap", "Tiling", "TritonTilings",
    "XlaTilings", "compress", "compressed_attention", "default_tilings", "gate_and_combine",
    "init_compress_params", "nsa_attention", "reblock", "reference", "reverse_map",
    "segment_ids_from_cu_seqlens", "select_blocks", "selected_attention",
    "sliding_window_attention",
]
