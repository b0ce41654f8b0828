"""Pallas kernels for NSA, installed as ``nsa_jax.kernels``.

Kernels see only arrays and compact block metadata, never `NSAConfig`'s meaning. The Triton and
Mosaic GPU kernels have not landed yet; ``implementation="triton"``/``"mosaic"`` raise until then.
"""
