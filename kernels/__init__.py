"""Pallas kernels for NSA, installed as ``nsa_jax.kernels``.

Kernels see only arrays and compact block metadata, never `NSAConfig`'s meaning:
`flash_fwd` is the grouped flash-attention forward core shared by the three branches,
`flash_bwd` its backward (dQ over the same KV blocks, dK/dV over the query tiles that see each
KV block), `block_scores` sums compressed attention probabilities per query tile for block
selection, and `tiling` holds their frozen tilings with a default per GPU generation. All use the
Triton lowering; Mosaic GPU (Hopper) kernels are still to come.
"""
