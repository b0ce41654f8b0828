"""Pallas kernels for NSA, installed as ``nsa_jax.kernels``.

Kernels see only arrays and compact block metadata, never `NSAConfig`'s meaning.

- `common`: what every backend shares: the token mask rule (`MaskRule`) and the block and tile
  ranges it implies, the block metadata handed to kernels (`BlockTable`, `ReverseTable`), and the
  grouped row layout of a launch (`Launch`: queries x the G heads of one KV head per program,
  padding and reshapes; `Program`: what a kernel body knows statically).
- `triton/`: kernels lowered through Triton, portable across NVIDIA GPUs and runnable in interpret
  mode: `flash_fwd` (the flash-attention forward core shared by the three branches), `flash_bwd`
  (dQ, and dK/dV without atomics), `block_scores` (compressed attention mass per query tile for
  block selection) and `tiling` (their frozen tilings, with a default per GPU generation).
- `mosaic_gpu/`: Pallas Mosaic GPU kernels for Hopper on the same `common` pieces: `flash_fwd`
  (the forward core, warp-specialised with a TMA ring and wgmma), `flash_bwd` (dQ and dK/dV on
  the same core), `block_scores` (the compressed mass of tiled scoring) and `tiling` (the
  "mosaic" backend's tilings); all run under the Mosaic GPU interpreter on CPU.
"""
