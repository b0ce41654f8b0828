"""Packed sequences: segment ids, cumulative lengths, and each token's place in its document.

A document is a maximal run of equal, non-zero ``segment_ids``; id 0 marks padding, which
belongs to no document (its outputs and gradients are zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD_ID = 0


def segment_ids_from_cu_seqlens(cu_seqlens, T: int):
    """int32[B, T] segment ids from cumulative lengths.

    Args:
      cu_seqlens: int [B, n + 1] (or [n + 1] for B = 1), non-decreasing, starting at 0: document
        ``i`` of row ``b`` holds tokens ``cu_seqlens[b, i] .. cu_seqlens[b, i + 1] - 1``.
        Tokens at or after the last entry are padding.
      T: row length.

    Returns:
      int32[B, T]: 1 + the document index, 0 for padding.
    """
    cu = jnp.asarray(cu_seqlens)
    if cu.ndim == 1:
        cu = cu[None]
    if cu.ndim != 2 or cu.shape[1] < 1 or not jnp.issubdtype(cu.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must be an integer array [B, n + 1] or [n + 1], got "
                         f"{cu.dtype} {tuple(cu.shape)}")
    t = jnp.arange(T)
    doc = jax.vmap(lambda c: jnp.searchsorted(c, t, side="right"))(cu)  # [B, T], 1-based
    return jnp.where(t[None] < cu[:, -1:], doc, PAD_ID).astype(jnp.int32)


def layout(segment_ids):
    """Each token's document: (run [B, T] id of its run, unique within the row; start [B, T]
    index of its document's first token; pos [B, T] = t - start; length [B, T] of its document;
    pad [B, T] bool)."""
    seg = jnp.asarray(segment_ids)
    B, T = seg.shape
    t = jnp.arange(T, dtype=jnp.int32)[None]
    boundary = jnp.concatenate([jnp.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    run = jnp.cumsum(boundary, axis=1, dtype=jnp.int32)  # 1-based
    start = jax.lax.cummax(jnp.where(boundary, t, 0), axis=1)
    counts = jax.vmap(lambda r: jnp.zeros(T + 1, jnp.int32).at[r].add(1))(run)  # [B, T + 1]
    length = jnp.take_along_axis(counts, run, axis=1)
    return run, start, t - start, length, seg == PAD_ID


def check(segment_ids, B: int, T: int) -> None:
    """``segment_ids`` must be an integer array [B, T]."""
    if segment_ids is None:
        return
    shape = tuple(getattr(segment_ids, "shape", ()))
    dtype = getattr(segment_ids, "dtype", None)
    if shape != (B, T):
        raise ValueError(f"segment_ids must have shape [B, T] = {(B, T)}, got {shape}")
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"segment_ids.dtype={dtype} must be an integer type")
