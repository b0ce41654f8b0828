"""The "xla" implementation: tiled, never dense. Peak memory grows O(T) for a fixed config.

Every branch walks query tiles with `lax.map`, scores each tile against only the keys it may see
(all compressed tokens, a gather of the selected blocks, or a band of the window) and runs the
shared masked-softmax core `attend`. Tile bodies are rematerialised in the backward pass, so
gradients keep the same memory bound.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from nsa_jax.config import NSAConfig
from nsa_jax.metadata import BlockSparseIndices
from nsa_jax.ops import base
from nsa_jax.ops.selection import block_scores, choose_blocks, document_blocks, kv_blocks


@dataclasses.dataclass(frozen=True, kw_only=True)
class XlaTilings:
    """Tiling of the "xla" backend (speed and peak memory only, never results).

    Attributes:
      rows: query rows (tile size times tiles per step) one loop step handles; a power of two.
    """

    rows: int = 64

    def __post_init__(self):
        r = self.rows
        if isinstance(r, bool) or not isinstance(r, int) or r < 1 or r & (r - 1):
            raise ValueError(f"XlaTilings.rows={r!r} must be a power of two >= 1")


def precision_for(dtype):
    """float32 inputs get float32 products (no TF32 on GPU); half inputs use the matrix units."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def attend(q, k, v, mask, scale: float, clean: bool = False):
    """Masked softmax attention with float32 statistics.

    Args:
      q: [X, G, M, D] query rows (G heads sharing the keys).
      k: [X, L, D] keys; v: [X, L, Dv] values.
      mask: bool, broadcastable to [X, G, M, L].
      clean: zero the values no row sees first, so that whatever unwritten cache slots hold (even
        NaN) cannot reach the output through a zero probability.

    Returns:
      o [X, G, M, Dv] float32 (zero for rows without a visible key) and lse [X, G, M] float32
      (-inf for those rows).
    """
    prec = precision_for(q.dtype)
    s = jnp.einsum("xgmd,xld->xgml", q, k, precision=prec,
                   preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, initial=-jnp.inf))  # [X, G, M]
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    l = p.sum(-1)
    l_safe = jnp.where(l > 0, l, 1.0)
    if clean:
        seen = jnp.broadcast_to(mask, s.shape).any(axis=(1, 2))  # [X, L]
        v = jnp.where(seen[..., None], v, jnp.zeros((), v.dtype))
    o = jnp.einsum("xgml,xlv->xgmv", p.astype(v.dtype), v, precision=prec,
                   preferred_element_type=jnp.float32) / l_safe[..., None]
    lse = jnp.where(l > 0, m_safe + jnp.log(l_safe), -jnp.inf)
    return o, lse


def query_positions(B: int, T: int, S, kv_len=None):
    """Key position of each query: t + (S - T), per batch row when ``kv_len`` is int32[B]."""
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    if kv_len is None:
        return jnp.broadcast_to(t + (S - T), (B, T))
    return t + (kv_len[:, None] - T)


def _tiles(x, tile: int, axis: int):
    """Splits ``axis`` into [n, tile] (zero padded) and moves n to the front."""
    n = -(-x.shape[axis] // tile)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n * tile - x.shape[axis])
    x = jnp.pad(x, pad)
    x = x.reshape(*x.shape[:axis], n, tile, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _untile(x, axis: int, length: int):
    """Inverse of `_tiles`: [n, ..., tile, ...] with the tile at ``axis`` (counted without n)."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])
    return lax.slice_in_dim(x, 0, length, axis=axis)


def _grouped(q, H: int):
    """[B, T, HQ, D] -> [B, H, G, T, D]; query head h uses KV head h // G."""
    B, T, HQ, D = q.shape
    return q.reshape(B, T, H, HQ // H, D).transpose(0, 2, 3, 1, 4)


def _ungrouped(o):
    """[B, H, G, T, Dv] -> [B, T, HQ, Dv]."""
    B, H, G, T, Dv = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H * G, Dv)


def _map_tiles(body, *xs):
    return lax.map(jax.checkpoint(body), xs)


def compressed_visible(pos, N_c: int, cfg: NSAConfig, kv_len=None, bounds=None):
    """[B, M] positions -> bool [B, M, N_c]: compressed token i is visible to the query at pos
    (and, with ``bounds`` = (lo, hi) [B, M] for packed rows, lo <= i < hi)."""
    i = jnp.arange(N_c, dtype=jnp.int32)
    last = i * cfg.compress_stride + cfg.compress_block - 1
    if cfg.causal:
        vis = last[None, None, :] <= pos[:, :, None]
    elif kv_len is None:
        vis = jnp.ones((*pos.shape, N_c), bool)
    else:
        vis = jnp.broadcast_to(last[None, None, :] < kv_len[:, None, None], (*pos.shape, N_c))
    if bounds is not None:
        lo, hi = bounds
        vis = vis & (i >= lo[..., None]) & (i < hi[..., None])
    return vis


def _compressed_scores(q_tile, kc, pos_tile, cfg, scale, kv_len, bounds=None):
    """Logits of a tile of grouped queries [B, H, G, M, D] against kc [B, H, N_c, D]."""
    B, H, G, M, D = q_tile.shape
    N_c = kc.shape[2]
    vis = compressed_visible(pos_tile, N_c, cfg, kv_len, bounds)  # [B, M, N_c]
    mask = jnp.broadcast_to(vis[:, None, None], (B, H, 1, M, N_c)).reshape(B * H, 1, M, N_c)
    return q_tile.reshape(B * H, G, M, D), kc.reshape(B * H, N_c, D), mask


def compressed_attention(q, k_c, v_c, cfg: NSAConfig, S: int, kv_len=None, bounds=None,
                         rows: int = 64):
    """``bounds``: optional `segments.CompressedBounds`, the compressed tokens each query's
    document owns (packed rows)."""
    B, T, HQ, D = q.shape
    H, N_c, Dv = k_c.shape[2], k_c.shape[1], v_c.shape[3]
    scale = cfg.softmax_scale(D)
    pos = query_positions(B, T, S, kv_len)
    kc = k_c.transpose(0, 2, 1, 3)  # [B, H, N_c, D]
    vc = v_c.transpose(0, 2, 1, 3).reshape(B * H, N_c, Dv)
    tile = min(rows, T)

    def body(args):
        q_tile, pos_tile = args[:2]  # [B, H, G, tile, D], [B, tile]
        qx, kx, mask = _compressed_scores(q_tile, kc, pos_tile, cfg, scale, kv_len, args[2:] or None)
        o, lse = attend(qx, kx, vc, mask, scale, clean=kv_len is not None)
        G = q_tile.shape[2]
        return o.reshape(B, H, G, tile, Dv), lse.reshape(B, H, G, tile)

    xs = [_tiles(_grouped(q, H), tile, 3), _tiles(pos, tile, 1)]
    if bounds is not None:
        xs += [_tiles(x, tile, 1) for x in bounds]
    o, lse = _map_tiles(body, *xs)
    o = _ungrouped(_untile(o, 3, T))
    lse = _untile(lse, 3, T)  # [B, H, G, T]
    return o.astype(q.dtype), lse.transpose(0, 3, 1, 2).reshape(B, T, HQ)


def select_blocks(q, k_c, cfg: NSAConfig, S: int, kv_len=None, lse=None, bounds=None,
                  rows: int = 64):
    """``bounds``: optional `segments.KeyBounds`, the keys of each query's document (packed rows
    in the aligned layout); tiles then choose among their document's blocks."""
    B, T, HQ, D = q.shape
    H, N_c = k_c.shape[2], k_c.shape[1]
    G = HQ // H
    qt, ls = cfg.select_q_tile, cfg.select_block
    N_s = -(-S // ls)
    N_tiles = -(-T // qt)
    C = max(1, min(rows // qt, N_tiles))  # tiles per loop step
    scale = cfg.softmax_scale(D)
    pos = query_positions(B, T, S, kv_len)
    n_kv_blocks = kv_blocks(B, S, cfg, kv_len)
    kc = lax.stop_gradient(k_c).transpose(0, 2, 1, 3)  # [B, H, N_c, D]
    qg = _grouped(lax.stop_gradient(q), H)  # [B, H, G, T, D]
    # Rows past T are padding; they must not add to their tile's score.
    real = jnp.arange(N_tiles * qt) < T
    if lse is None:
        lse_g = None
    else:
        lse_g = lax.stop_gradient(lse).reshape(B, T, H, G).transpose(0, 2, 3, 1)  # [B, H, G, T]
    tile_first = jnp.arange(N_tiles, dtype=jnp.int32) * qt
    tile_last = jnp.minimum(tile_first + qt - 1, T - 1)
    offset = pos[:, :1]  # [B, 1]
    if bounds is not None:
        c_bounds = bounds.compressed(cfg)
        n_kv_blocks, first_block = document_blocks(bounds, tile_first, cfg)  # [B, N_tiles, 1]

    def body(args):
        q_c, pos_c, real_c, first_c, last_c = args[:5]
        # q_c [B, H, G, C*qt, D], pos_c [B, C*qt], real_c [C*qt], first_c/last_c [C]
        rest = args[5 + (lse_g is not None):]
        cb = None if bounds is None else rest[:2]
        qx, kx, mask = _compressed_scores(q_c, kc, pos_c, cfg, scale, kv_len, cb)
        s = jnp.einsum("xgmd,xnd->xgmn", qx, kx, precision=precision_for(q.dtype),
                       preferred_element_type=jnp.float32) * scale
        s = jnp.where(mask, s, -jnp.inf)
        if lse_g is None:
            lse_c = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        else:
            lse_c = args[5].reshape(B * H, G, -1)[..., None]
        p = jnp.where(mask & jnp.isfinite(lse_c), jnp.exp(s - jnp.where(jnp.isfinite(lse_c), lse_c, 0.0)), 0.0)
        p = jnp.where(real_c[None, None, :, None], p, 0.0)
        # Two reshapes: under an explicit mesh one cannot both split B * H and the rows.
        p = p.reshape(B, H, G, C * qt, N_c).reshape(B, H, G, C, qt, N_c).sum(axis=(2, 4))
        scores = block_scores(p, cfg, N_s)  # [B, H, C, N_s]
        if bounds is None:
            return choose_blocks(scores, first_c[None] + offset, last_c[None] + offset, cfg,
                                 n_kv_blocks)
        return choose_blocks(scores, first_c[None] + offset, last_c[None] + offset, cfg, *rest[2:])

    step = C * qt
    xs = [_tiles(qg, step, 3), _tiles(pos, step, 1), _tiles(real, step, 0),
          _tiles(tile_first, C, 0), _tiles(tile_last, C, 0)]
    if lse_g is not None:
        xs.append(_tiles(lse_g, step, 3))
    if bounds is not None:
        xs += [_tiles(x, step, 1) for x in c_bounds]
        xs += [_tiles(x, C, 1) for x in (n_kv_blocks, first_block)]
    idx, cnt = lax.map(body, tuple(xs))  # [n, B, H, C, n_sel], [n, B, H, C]
    idx = _untile(idx, 2, N_tiles)
    cnt = _untile(cnt, 2, N_tiles)
    return BlockSparseIndices(idx, cnt, q_tile=qt, block_size=ls)


def selected_attention(q, k, v, sel: BlockSparseIndices, cfg: NSAConfig, bounds=None,
                       rows: int = 64, kv_len=None):
    """``bounds``: optional `segments.KeyBounds`, the keys of each query's document (packed);
    ``kv_len``: optional int32[B] keys per row."""
    B, T, HQ, D = q.shape
    S, H, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = HQ // H
    qt, bs = sel.q_tile, sel.block_size
    N_tiles, n_sel = sel.indices.shape[2], sel.indices.shape[3]
    C = max(1, min(rows // qt, N_tiles))
    L = n_sel * bs
    scale = cfg.softmax_scale(D)
    pos = query_positions(B, T, S, kv_len)
    length = jnp.full((B,), S, jnp.int32) if kv_len is None else kv_len
    kh = k.transpose(0, 2, 1, 3)  # [B, H, S, D]
    vh = v.transpose(0, 2, 1, 3)
    # Queries padded up to whole tiles (and whole steps of C tiles).
    qg = _grouped(q, H)  # [B, H, G, T, D]
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, N_tiles * qt - T), (0, 0)))
    qg = qg.reshape(B, H, G, N_tiles, qt, D).transpose(0, 1, 3, 2, 4, 5)  # [B, H, N_tiles, G, qt, D]
    pos = jnp.pad(pos, ((0, 0), (0, N_tiles * qt - T)), constant_values=-1)
    pos = pos.reshape(B, N_tiles, qt)
    offs = jnp.arange(bs, dtype=jnp.int32)
    xs = [_tiles(qg, C, 2), _tiles(pos, C, 1), _tiles(sel.indices, C, 2)]
    if bounds is not None:
        xs += [_tiles(jnp.pad(x, ((0, 0), (0, N_tiles * qt - T))).reshape(B, N_tiles, qt), C, 1)
               for x in bounds]

    def body(args):
        q_c, pos_c, ids_c = args[:3]  # [B, H, C, G, qt, D], [B, C, qt], [B, H, C, n_sel]
        s_pos = (ids_c[..., None] * bs + offs).reshape(B, H, C * L)  # key positions
        ok = (jnp.repeat(ids_c >= 0, bs, axis=-1).reshape(B, H, C * L)) & (
            s_pos < length[:, None, None])
        s_idx = jnp.where(ok, s_pos, 0)
        # Split, then merge: one reshape doing both is ambiguous under an explicit mesh.
        gather = lambda x: jnp.take_along_axis(x, s_idx[..., None], axis=2).reshape(
            B, H, C, L, x.shape[-1]).reshape(B * H * C, L, x.shape[-1])
        k_c, v_c = gather(kh), gather(vh)
        ok = ok.reshape(B, H, C, 1, 1, L)
        s_pos = s_pos.reshape(B, H, C, 1, 1, L)
        mask = ok
        if cfg.causal:
            mask = mask & (s_pos <= pos_c[:, None, :, None, :, None])
        if bounds is not None:
            lo, hi = (x[:, None, :, None, :, None] for x in args[3:])  # [B, 1, C, 1, qt, 1]
            mask = mask & (s_pos >= lo) & (s_pos < hi)
        mask = jnp.broadcast_to(mask, (B, H, C, 1, qt, L)).reshape(B * H * C, 1, qt, L)
        # Materialise the mask once: otherwise XLA:CPU fuses its computation into every consumer
        # and recomputes it there (on CPU, T=2048 per token: forward 0.47 -> 0.34 s).
        mask = jax.lax.optimization_barrier(mask)
        o, _ = attend(q_c.reshape(B * H * C, G, qt, D), k_c, v_c, mask, scale,
                      clean=kv_len is not None)
        return o.reshape(B, H, C, G, qt, Dv)

    o = _map_tiles(body, *xs)
    o = _untile(o, 2, N_tiles)  # [B, H, N_tiles, G, qt, Dv]
    o = o.transpose(0, 1, 3, 2, 4, 5).reshape(B, H, G, N_tiles * qt, Dv)[:, :, :, :T]
    return _ungrouped(o).astype(q.dtype)


def sliding_window_attention(q, k, v, cfg: NSAConfig, bounds=None, rows: int = 64, kv_len=None):
    """``bounds``: optional `segments.KeyBounds`, the keys of each query's document (packed);
    ``kv_len``: optional int32[B] keys per row."""
    B, T, HQ, D = q.shape
    S, H, Dv = k.shape[1], k.shape[2], v.shape[3]
    w = cfg.window
    if w == 0:
        return jnp.zeros((B, T, HQ, Dv), q.dtype)
    scale = cfg.softmax_scale(D)
    tile = min(rows, T)
    n = -(-T // tile)
    reach = w - 1 if not cfg.causal else 0  # keys after the query that are in the window
    L = tile + w - 1 + reach
    # Non-causal queries may sit before key 0 (S < T, or a row's kv_len < T); padding in front
    # keeps every slice start at or after 0.
    early = T if kv_len is not None and not cfg.causal else max(0, T - S)
    front = w - 1 + early
    pad = ((0, 0), (0, 0), (front, n * tile - T + reach), (0, 0))
    kh, vh = (jnp.pad(x.transpose(0, 2, 1, 3), pad) for x in (k, v))
    offs = jnp.arange(L, dtype=jnp.int32)
    qpos = jnp.arange(tile, dtype=jnp.int32)
    if kv_len is None:  # one slice start for every row ([1] standing for [B])
        length = jnp.full((1,), S, jnp.int32)
        cut = lambda x, start: lax.dynamic_slice_in_dim(x, start[0], L, axis=2)
    else:  # one per row: a dynamic slice under vmap
        length = kv_len
        cut = jax.vmap(lambda x, start: lax.dynamic_slice_in_dim(x, start, L, axis=1))
    offset = length - T  # key position of query 0

    def body(args):
        q_tile, t0 = args[:2]  # [B, H, G, tile, D], scalar first query index
        p0 = t0 + offset  # [B or 1]
        # Padded coordinates are shifted by `front`: padded index p0 - w + 1 + front holds key
        # p0 - w + 1, the first the tile may see.
        k_t = cut(kh, p0 - (w - 1) + front)  # [B, H, L, D]
        v_t = cut(vh, p0 - (w - 1) + front)
        s_pos = (p0 - (w - 1))[:, None] + offs  # [B or 1, L]
        t_pos = p0[:, None] + qpos  # [B or 1, tile]
        diff = t_pos[:, :, None] - s_pos[:, None, :]  # [B or 1, tile, L]
        mask = ((s_pos >= 0) & (s_pos < length[:, None]))[:, None, :]
        mask = mask & ((diff >= 0) & (diff < w) if cfg.causal else (jnp.abs(diff) < w))
        if bounds is not None:
            lo, hi = args[2:]  # [B, tile]
            mask = mask & (s_pos[:, None, :] >= lo[..., None]) & (s_pos[:, None, :] < hi[..., None])
        if mask.shape[0] == 1:
            mask = mask[:, None]  # [1, 1, tile, L]
        else:
            mask = jnp.broadcast_to(mask[:, None, None], (B, H, 1, tile, L))
            mask = mask.reshape(B * H, 1, tile, L)
        G = q_tile.shape[2]
        o, _ = attend(q_tile.reshape(B * H, G, tile, D), k_t.reshape(B * H, L, D),
                      v_t.reshape(B * H, L, Dv), mask, scale, clean=kv_len is not None)
        return o.reshape(B, H, G, tile, Dv)

    starts = jnp.arange(n, dtype=jnp.int32) * tile
    xs = [_tiles(_grouped(q, H), tile, 3), starts]
    if bounds is not None:
        xs += [_tiles(x, tile, 1) for x in bounds]
    o = _map_tiles(body, *xs)
    return _ungrouped(_untile(o, 3, T)).astype(q.dtype)


class XlaBackend(base.Backend):
    """Tiled `jnp` on any JAX platform; supports every call."""

    name = "xla"
    tilings_type = XlaTilings

    def compressed_attention(self, q, k_c, v_c, config, *, S, kv_len, compressed_bounds,
                             interpret, tilings):
        return compressed_attention(q, k_c, v_c, config, S, kv_len, compressed_bounds, tilings.rows)

    def select_blocks(self, q, k_c, config, *, S, kv_len, lse, key_bounds, interpret, tilings):
        return select_blocks(q, k_c, config, S, kv_len, lse, key_bounds, tilings.rows)

    def selected_attention(self, q, k, v, sel, config, *, kv_len, key_bounds, interpret, tilings):
        return selected_attention(q, k, v, sel, config, key_bounds, tilings.rows, kv_len)

    def sliding_window_attention(self, q, k, v, config, *, kv_len, key_bounds, interpret,
                                 tilings):
        return sliding_window_attention(q, k, v, config, key_bounds, tilings.rows, kv_len)


BACKEND = XlaBackend()
