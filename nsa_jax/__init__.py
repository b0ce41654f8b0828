"""Native Sparse Attention for JAX: compressed, selected and sliding-window attention, gated."""

from nsa_jax import reference
from nsa_jax.api import (compressed_attention, gate_and_combine, nsa_attention, select_blocks,
                         selected_attention, sliding_window_attention)
from nsa_jax.compression import compress
from nsa_jax.compression import init_params as init_compress_params
from nsa_jax.config import NSAConfig
from nsa_jax.kernels.triton.tiling import Tiling, TritonTilings, default_tilings
from nsa_jax.metadata import BlockSparseIndices, ReverseBlockMap, reblock, reverse_map
from nsa_jax.segments import segment_ids_from_cu_seqlens
from nsa_jax.module import NSAAttention

__all__ = [
    "BlockSparseIndices", "NSAAttention", "NSAConfig", "ReverseBlockMap", "Tiling", "TritonTilings",
    "compress", "compressed_attention", "default_tilings", "gate_and_combine", "init_compress_params",
    "nsa_attention", "reblock", "reference", "reverse_map", "segment_ids_from_cu_seqlens",
    "select_blocks", "selected_attention", "sliding_window_attention",
]
