"""Pallas kernels for NSA, installed as ``nsa_jax.kernels``.

Kernels see only arrays and compact block metadata, never `NSAConfig`'s meaning:
`flash_fwd` is the grouped flash-attention forward core shared by the three branches, and
`block_scores` sums compressed attention probabilities per query tile for block selection. Both
use the Triton lowering; Mosaic GPU (Hopper) kernels and the backward kernels are still to come.
"""
