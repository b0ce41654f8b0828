"""Packed sequences: segment ids, cumulative lengths, and each token's place in its document.

A document is a maximal run of equal, non-zero ``segment_ids``; id 0 marks padding, which
belongs to no document (its outputs and gradients are zero).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PAD_ID = 0


def segment_ids_from_cu_seqlens(cu_seqlens, T: int):
    """int32[B, T] segment ids from cumulative lengths.

    Args:
      cu_seqlens: int [B, n + 1] (or [n + 1] for B = 1), non-decreasing, starting at 0, at most
        ``T``: document ``i`` of row ``b`` holds tokens ``cu_seqlens[b, i] .. cu_seqlens[b, i + 1]
        - 1``. Tokens at or after the last entry are padding.
      T: row length.

    Returns:
      int32[B, T]: 1 + the document index, 0 for padding.

    Raises:
      ValueError: for offsets that break the rules above (at run time under jit).
    """
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 0:
        raise ValueError(f"T={T!r} must be a non-negative int")
    cu = jnp.asarray(cu_seqlens)
    if cu.ndim == 1:
        cu = cu[None]
    if cu.ndim != 2 or cu.shape[1] < 1 or not jnp.issubdtype(cu.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must be an integer array [B, n + 1] or [n + 1], got "
                         f"{cu.dtype} {tuple(cu.shape)}")
    if isinstance(cu, jax.core.Tracer):
        jax.debug.callback(functools.partial(_check_offsets, T=int(T)), cu)
    else:
        _check_offsets(cu, T=int(T))
    t = jnp.arange(T)
    doc = jax.vmap(lambda c: jnp.searchsorted(c, t, side="right"))(cu)  # [B, T], 1-based
    return jnp.where(t[None] < cu[:, -1:], doc, PAD_ID).astype(jnp.int32)


def _check_offsets(cu, *, T: int) -> None:
    cu = np.asarray(cu)
    if (cu[:, 0] != 0).any():
        raise ValueError(f"cu_seqlens must start at 0, got first entries {cu[:, 0].tolist()}")
    if (np.diff(cu, axis=1) < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    if (cu[:, -1] > T).any():
        raise ValueError(f"cu_seqlens must end at or before T={T}, got last entries "
                         f"{cu[:, -1].tolist()}")


def layout(segment_ids):
    """Each token's document: (run [B, T] id of its run, unique within the row; start [B, T]
    index of its document's first token; pos [B, T] = t - start; length [B, T] of its document;
    pad [B, T] bool)."""
    seg = jnp.asarray(segment_ids)
    B, T = seg.shape
    t = jnp.arange(T, dtype=jnp.int32)[None]
    boundary = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]],
                               axis=1)
    run = jnp.cumsum(boundary, axis=1, dtype=jnp.int32)  # 1-based
    start = jax.lax.cummax(jnp.where(boundary, t, 0), axis=1)
    counts = jax.vmap(lambda r: jnp.zeros(T + 1, jnp.int32).at[r].add(1))(run)  # [B, T + 1]
    length = jnp.take_along_axis(counts, run, axis=1)
    return run, start, t - start, length, seg == PAD_ID


def unit(config) -> int:
    """Alignment of documents in the packed layout: every document starts at a multiple of the
    compression stride, the selection block and the selection query tile, so its compressed
    tokens, selection blocks and query tiles are whole tokens, blocks and tiles of the layout."""
    return math.lcm(config.compress_stride, config.select_block, config.select_q_tile)


def capacity(T: int, config, max_segments: int | None = None) -> int:
    """Length of the aligned layout: room for ``max_segments`` documents (default ceil(T / unit),
    i.e. documents of ``unit`` tokens on average) of total length T, each rounded up to ``unit``."""
    A = unit(config)
    M = -(-T // A) if max_segments is None else max_segments
    return -(-(T + M * (A - 1)) // A) * A


class KeyBounds(NamedTuple):
    """Packed rows in the aligned layout: row t sees only the keys lo[t] <= s < hi[t] (its
    document). int32 [B, T_a] each, non-decreasing along a row; lo = hi for rows of no document."""

    lo: jax.Array
    hi: jax.Array

    def compressed(self, config) -> "CompressedBounds":
        """The compressed tokens of each row's document (compressed token c covers keys
        c * d .. c * d + l - 1 of the aligned layout)."""
        d, l = config.compress_stride, config.compress_block
        lo_c = (self.lo + d - 1) // d
        hi_c = jnp.maximum((self.hi - l) // d + 1, lo_c)
        return CompressedBounds(lo_c, jnp.where(self.hi > self.lo, hi_c, lo_c))


class CompressedBounds(NamedTuple):
    """Packed rows in the aligned layout: row t sees only the compressed tokens lo[t] <= i <
    hi[t] (those wholly inside its document). int32 [B, T_a] each, non-decreasing."""

    lo: jax.Array
    hi: jax.Array


class Packing(NamedTuple):
    """Where each token of a packed row sits in the aligned layout, and what each aligned row
    may see.

    dest: int32[B, T] aligned row of each token (T_a, out of range, for padding).
    lo, hi: int32[B, T_a] the aligned keys of each aligned row's document are lo .. hi - 1
      (lo = hi = the row itself for rows of no document). Both are non-decreasing along a row.
    """

    dest: jax.Array
    lo: jax.Array
    hi: jax.Array

    @property
    def length(self) -> int:
        """T_a, the aligned layout's length."""
        return self.lo.shape[1]

    @property
    def key_bounds(self) -> KeyBounds:
        return KeyBounds(self.lo, self.hi)

    def align(self, x):
        """[B, T, ...] -> [B, T_a, ...]: tokens moved to their aligned rows, zeros elsewhere.
        Padding tokens are dropped, so nothing in them (NaN included) reaches a document."""
        out = jnp.zeros((self.length, *x.shape[2:]), x.dtype)
        return jax.vmap(lambda d, r: out.at[d].set(r, mode="drop"))(self.dest, x)

    def restore(self, y, fill=0):
        """[B, T_a, ...] -> [B, T, ...]: each token's aligned row, ``fill`` for padding."""
        return jax.vmap(lambda r, d: r.at[d].get(mode="fill", fill_value=fill))(y, self.dest)


def pack(segment_ids, config, max_segments: int | None = None) -> Packing:
    """The aligned layout of ``segment_ids`` [B, T] (see `capacity`). Under jit a row needing more
    room than the layout has raises at run time, naming ``max_segments``."""
    seg = jnp.asarray(segment_ids)
    B, T = seg.shape
    A = unit(config)
    T_a = capacity(T, config, max_segments)
    run, start, pos, length, pad = layout(seg)
    first = (pos == 0) & ~pad
    slot = jnp.where(first, -(-length // A) * A, 0)  # [B, T]
    slot_start = jnp.cumsum(slot, axis=1) - slot
    doc_start = jnp.take_along_axis(slot_start, start, axis=1)  # aligned row of the first token
    dest = jnp.where(pad, T_a, doc_start + pos).astype(jnp.int32)
    used = slot.sum(axis=1)
    jax.debug.callback(functools.partial(_check_room, T_a=T_a, A=A, T=T), used)
    # Row by row (vmap): batch-sharded rows stay sharded, with no collective.
    rows = jnp.arange(T_a, dtype=jnp.int32)
    put = jax.vmap(lambda d, x: rows.at[d].set(x.astype(jnp.int32), mode="drop"))
    return Packing(dest, put(dest, doc_start), put(dest, doc_start + length))


def _check_room(used, *, T_a: int, A: int, T: int) -> None:
    used = np.asarray(used)
    if (used > T_a).any():
        raise ValueError(
            f"segment_ids: a packed row needs {int(used.max())} aligned tokens (each document "
            f"rounded up to {A}) but the layout holds {T_a}; pass max_segments >= the number of "
            f"documents per row (default covers {(T_a - T) // max(A - 1, 1)} for T={T})")


def in_documents(packing: Packing | None, body, *xs, fill=0):
    """``body(*xs, key_bounds)`` on each document as if it ran alone: the one path packed inputs
    take through every implementation.

    Without ``packing``, ``body(*xs, None)``. With it, the arrays ``xs`` ([B, T, ...] or None) move
    to the aligned layout, ``body`` gets the documents' `KeyBounds`, and its results move back,
    ``fill`` (one value, or one per result) where a token is padding; ``fill=None`` returns the
    results in the aligned layout (block selections, whose tiles are the layout's).
    """
    if packing is None:
        return body(*xs, None)
    out = body(*(None if x is None else packing.align(x) for x in xs), packing.key_bounds)
    if fill is None:
        return out
    if isinstance(out, tuple):
        fills = fill if isinstance(fill, tuple) else (fill,) * len(out)
        return tuple(packing.restore(y, f) for y, f in zip(out, fills))
    return packing.restore(out, fill)
