"""Compact block-sparse metadata (docs/design.md §4): the contract between selection and kernels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nsa_jax import _checks

_BIG = jnp.iinfo(jnp.int32).max


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparseIndices:
    """Selected KV blocks per (batch, KV head, query tile).

    Attributes:
      indices: int32[B, H, N_tiles, k], block ids sorted ascending, unique, -1 after ``counts``.
      counts: int32[B, H, N_tiles], valid entries per row.
      q_tile: queries per tile (1 = per-token selection); static.
      block_size: keys per block the ids refer to; static.
    """

    indices: jax.Array
    counts: jax.Array
    q_tile: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_tiles(self) -> int:
        return self.indices.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReverseBlockMap:
    """For each KV block, the query tiles that selected it (compressed-row layout, O(T) memory).

    Attributes:
      tiles: int32[B, H, N_tiles * k], query tile ids grouped by KV block (ascending within a
        block), -1 at the end for unused slots.
      offsets: int32[B, H, N_kv + 1], block ``j`` owns ``tiles[..., offsets[j]:offsets[j+1]]``.
      q_tile, block_size: as in `BlockSparseIndices`; static.
    """

    tiles: jax.Array
    offsets: jax.Array
    q_tile: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def counts(self) -> jax.Array:
        return jnp.diff(self.offsets, axis=-1)


def compact(ids, valid):
    """Sorts ``ids`` [..., m] ascending, drops invalid entries and duplicates, pads with -1.

    Returns (indices [..., m], counts [...]).
    """
    s = jnp.sort(jnp.where(valid, ids, _BIG), axis=-1)
    dup = s[..., 1:] == s[..., :-1]
    s = jnp.concatenate([s[..., :1], jnp.where(dup, _BIG, s[..., 1:])], axis=-1)
    s = jnp.sort(s, axis=-1)
    kept = s < _BIG
    return jnp.where(kept, s, -1).astype(jnp.int32), kept.sum(-1, dtype=jnp.int32)


def from_per_token(indices, block_size: int, num_blocks: int) -> BlockSparseIndices:
    """Per-token indices int32[B, T, H, n] (PyTorch layout) -> q_tile = 1 metadata. Entries
    outside [0, num_blocks) (-1 by convention) are ignored wherever they stand."""
    _checks.rank("indices", indices, 4, "[B, T, H, n]")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices.dtype={indices.dtype} must be an integer type")
    ids = jnp.moveaxis(jnp.asarray(indices, jnp.int32), 1, 2)  # [B, H, T, n]
    ids, counts = compact(ids, (ids >= 0) & (ids < num_blocks))
    return BlockSparseIndices(ids, counts, q_tile=1, block_size=block_size)


def normalize(sel: BlockSparseIndices, num_blocks: int) -> BlockSparseIndices:
    """Indices as docs/design.md §4 reads them, in the form `select_blocks` makes: an entry counts
    iff its position is below ``counts`` (clamped to [0, k]) and its id is in [0, num_blocks);
    then sorted, unique, -1 padded. Kernels trust ``counts``, so user-built indices pass here.

    Indices already in that form (those of `select_blocks`) come back as they are: one check over
    the array decides, and the two sorts run only when it fails.
    """
    k = sel.indices.shape[-1]
    ids, counts = sel.indices.astype(jnp.int32), sel.counts.astype(jnp.int32)
    used = jnp.arange(k, dtype=jnp.int32) < jnp.clip(counts, 0, k)[..., None]
    valid = used & (ids >= 0) & (ids < num_blocks)
    rising = jnp.concatenate([jnp.ones_like(valid[..., :1]), ids[..., 1:] > ids[..., :-1]], -1)
    canonical = (jnp.all(jnp.where(used, valid & rising, ids == -1))
                 & jnp.all((counts >= 0) & (counts <= k)))
    ids, counts = jax.lax.cond(canonical, lambda: (ids, counts), lambda: compact(ids, valid))
    return BlockSparseIndices(ids, counts, q_tile=sel.q_tile, block_size=sel.block_size)


def expand(sel: BlockSparseIndices, block_k: int, num_kv_blocks: int | None = None) -> BlockSparseIndices:
    """Re-blocks to smaller KV tiles: each block becomes ``block_size // block_k`` consecutive ids.

    With ``num_kv_blocks`` (the number of ``block_k`` tiles holding keys), the tiles of a last,
    partial block that lie past the keys are dropped, so no id points past the keys.
    """
    if sel.block_size % block_k:
        raise ValueError(f"block_k={block_k} must divide block_size={sel.block_size}")
    r = sel.block_size // block_k
    ids = sel.indices[..., None] * r + jnp.arange(r, dtype=jnp.int32)  # [B, H, N_tiles, k, r]
    keep = jnp.broadcast_to(sel.indices[..., None] >= 0, ids.shape)
    if num_kv_blocks is not None:
        keep &= ids < num_kv_blocks
    ids = jnp.where(keep, ids, -1).reshape(*sel.indices.shape[:-1], -1)
    # Rows are sorted with -1 last and only the largest ids are dropped, so expanded rows stay
    # sorted with -1 last.
    counts = keep.sum((-2, -1), dtype=jnp.int32)
    return BlockSparseIndices(ids, counts, q_tile=sel.q_tile, block_size=block_k)


def contract(sel: BlockSparseIndices, block_k: int, num_kv_blocks: int | None = None) -> BlockSparseIndices:
    """Re-blocks to larger KV tiles: ids map to ``id * block_size // block_k``, deduplicated.

    The last dimension is bounded statically by min(k, num_kv_blocks) when ``num_kv_blocks`` (the
    number of ``block_k`` tiles in the sequence) is given.
    """
    if block_k % sel.block_size:
        raise ValueError(f"block_k={block_k} must be a multiple of block_size={sel.block_size}")
    k = sel.indices.shape[-1]
    ids, counts = compact(sel.indices * sel.block_size // block_k, sel.indices >= 0)
    if num_kv_blocks is not None and num_kv_blocks < k:
        ids = ids[..., :num_kv_blocks]
    return BlockSparseIndices(ids, counts, q_tile=sel.q_tile, block_size=block_k)


def reblock(sel: BlockSparseIndices, block_k: int, num_kv_blocks: int | None = None) -> BlockSparseIndices:
    """Expansion or contraction, whichever ``block_k`` needs; identity when it equals block_size."""
    if block_k == sel.block_size:
        return sel
    if block_k < sel.block_size:
        return expand(sel, block_k, num_kv_blocks)
    return contract(sel, block_k, num_kv_blocks)


def entries_by_block(ids, valid, num_kv_blocks: int):
    """The (row, slot) entries of ids [B, H, R, k] grouped by block.

    Returns entries int32 [B, H, R * k]: ``row * k + slot`` of the ``valid`` entries, by block
    then ascending, -1 after the last; and offsets int32 [B, H, num_kv_blocks + 1]: block j owns
    ``entries[..., offsets[j]:offsets[j + 1]]``.
    """
    B, H, R, k = ids.shape
    key = jnp.where(valid & (ids >= 0), ids, num_kv_blocks).reshape(B, H, R * k)
    order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
    sorted_key = jnp.take_along_axis(key, order, axis=-1)
    entries = jnp.where(sorted_key < num_kv_blocks, order, -1)
    edges = jnp.arange(num_kv_blocks + 1, dtype=key.dtype)
    search = jax.vmap(jax.vmap(lambda a: jnp.searchsorted(a, edges, side="left")))
    return entries, search(sorted_key).astype(jnp.int32)


def reverse_map(sel: BlockSparseIndices, num_kv_blocks: int) -> ReverseBlockMap:
    """The query tiles that selected each KV block, for deterministic dK/dV without atomics."""
    k = sel.indices.shape[-1]
    entries, offsets = entries_by_block(sel.indices, True, num_kv_blocks)
    tiles = jnp.where(entries >= 0, entries // k, -1)
    return ReverseBlockMap(tiles.astype(jnp.int32), offsets, q_tile=sel.q_tile,
                           block_size=sel.block_size)
