"""Block selection from compressed attention mass (docs/design.md §3, Selection), shared by every
fast backend.

A backend computes the compressed mass each query tile puts on each compressed token (summed over
the tile's queries and the G heads of a KV head); everything after that is here: the linear map
onto selection blocks, which blocks a tile may take (eligible) and must take (forced), and the
top-n choice. The reference keeps its own dense version of these rules and shares none of them.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

from nsa_jax.config import NSAConfig
from nsa_jax.metadata import compact


def block_scores(mass, cfg: NSAConfig, N_s: int):
    """Compressed attention mass [..., N_c] -> selection-block scores [..., N_s].

    Compressed token i covers r = l / d stride chunks i .. i + r - 1 of d keys each; every chunk
    lies inside one selection block because l' is a multiple of d. So each chunk receives 1 / r of
    the token's mass, and a block's score is the sum over its l' / d chunks.
    """
    l, d, ls = cfg.compress_block, cfg.compress_stride, cfg.select_block
    r, per_block = l // d, ls // d
    N_c = mass.shape[-1]
    n_chunks = N_s * per_block
    width = max(n_chunks, N_c + r - 1)
    share = mass.astype(jnp.float32) / r
    # Shifted copies summed in order, not a scatter-add: under an explicit-axes mesh a scatter
    # into a fresh array has no sharding to agree with.
    edge = lambda m: [(0, 0)] * (mass.ndim - 1) + [(m, width - N_c - m)]
    chunks = functools.reduce(jnp.add, [jnp.pad(share, edge(m)) for m in range(r)])
    return chunks[..., :n_chunks].reshape(*mass.shape[:-1], N_s, per_block).sum(-1)


def selection_masks(tile_first, tile_last, N_s: int, cfg: NSAConfig, kv_len_blocks, first_block=0):
    """Eligible and forced blocks for tiles spanning key positions [tile_first, tile_last].

    Args:
      tile_first, tile_last: int32[B, C] positions of each tile's first and last query.
      kv_len_blocks: int32 broadcastable to [B, C, 1]: blocks past it hold no key of the tile's
        sequence (ceil(S / l'); for packed rows, the end of the tile's document).
      first_block: int32 broadcastable to [B, C, 1]: the first block of the tile's sequence
        (packed rows); the initial blocks count from it.

    Returns:
      (eligible, forced) bool [B, C, N_s].
    """
    ls = cfg.select_block
    j = jnp.arange(N_s, dtype=jnp.int32)[None, None, :]
    eligible = (j < kv_len_blocks) & (j >= first_block)
    if cfg.causal:
        eligible &= j * ls <= tile_last[..., None]
    forced = j < first_block + cfg.num_initial
    if cfg.num_local >= 1:
        first_blk = (tile_first // ls)[..., None]
        last_blk = (tile_last // ls)[..., None]
        forced = forced | ((j >= first_blk - (cfg.num_local - 1)) & (j <= last_blk))
    shape = (*tile_last.shape, N_s)
    return jnp.broadcast_to(eligible, shape), jnp.broadcast_to(forced & eligible, shape)


def tile_blocks(tile_first, tile_last, N_s: int, cfg: NSAConfig):
    """bool [B, C, N_s]: the blocks a tile's own queries sit in."""
    ls = cfg.select_block
    j = jnp.arange(N_s, dtype=jnp.int32)[None, None, :]
    return (j >= (tile_first // ls)[..., None]) & (j <= (tile_last // ls)[..., None])


def top_blocks(scores, eligible, forced, n: int, own=None):
    """Top-n eligible blocks (forced first, ties to the lower id) -> sorted ids and counts.

    When a tile's forced blocks outnumber n (only possible for a query tile that straddles a block
    boundary, i.e. a decode offset S - T that is not a multiple of l'), the tile's ``own`` blocks
    win over the other forced ones, so no query loses its own block.
    """
    key = jnp.where(eligible, scores, -jnp.inf)
    key = jnp.where(forced, jnp.finfo(jnp.float32).max, key)
    if own is not None:
        key = jnp.where(forced & own, jnp.inf, key)
    if key.shape[-1] < n:
        key = jnp.pad(key, [(0, 0)] * (key.ndim - 1) + [(0, n - key.shape[-1])],
                      constant_values=-jnp.inf)
    # A stable sort, not lax.top_k: the same choice (ties to the lower id) and, on an H200,
    # faster at every size selection uses (top_k's kernel took 62 us of a 300 us decode step).
    ids = lax.broadcasted_iota(jnp.int32, key.shape, key.ndim - 1)
    neg, ids = lax.sort((-key, ids), dimension=key.ndim - 1, num_keys=1, is_stable=True)
    return compact(ids[..., :n], neg[..., :n] < jnp.inf)


def choose_blocks(scores, tile_first, tile_last, cfg: NSAConfig, kv_len_blocks, first_block=0):
    """Block scores [B, H, C, N_s] of tiles spanning positions [tile_first, tile_last] ([B, C])
    -> (ids [B, H, C, n], counts [B, H, C]); the last two arguments as in `selection_masks`."""
    N_s = scores.shape[-1]
    eligible, forced = selection_masks(tile_first, tile_last, N_s, cfg, kv_len_blocks, first_block)
    own = tile_blocks(tile_first, tile_last, N_s, cfg)[:, None] if cfg.num_local >= 1 else None
    return top_blocks(scores, eligible[:, None], forced[:, None], cfg.num_selected, own)


def kv_blocks(B: int, S: int, cfg: NSAConfig, kv_len=None):
    """int32[B, 1, 1]: selection blocks holding keys, ceil(S / l') per batch row."""
    length = jnp.full((B,), S, jnp.int32) if kv_len is None else kv_len
    return (-(-length // cfg.select_block))[:, None, None]


def document_blocks(bounds, first, cfg: NSAConfig):
    """Packed rows: (kv_len_blocks, first_block) [B, C, 1] of tiles whose first query is at
    ``first`` [C], from the token bounds (lo, hi) [B, T] of each query's document."""
    ls = cfg.select_block
    lo, hi = (jnp.take(x, first, axis=1)[..., None] for x in bounds)
    return jnp.where(hi > lo, -(-hi // ls), lo // ls), lo // ls


def tile_span(tile_start, q_tile: int, T: int, offsets):
    """Key positions (first, last) int32[B, C] of the real queries of the tiles starting at query
    indices ``tile_start`` [C]; ``offsets`` int32[B] is each row's S - T."""
    last = jnp.minimum(tile_start + q_tile - 1, T - 1)
    return tile_start[None] + offsets[:, None], last[None] + offsets[:, None]
