"""Dense jnp reference for every NSA piece and their composition (DESIGN.md §3).

Written for clarity, not speed: float32 throughout (float64 for float64 inputs, so that gradients
can be checked by finite differences), ``precision=HIGHEST``, and masks over the full
[T, S] (or [T, N_c]) grid built straight from the rules in DESIGN.md. Every other implementation
is tested against these functions; they share no code with them beyond input validation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import _checks, segments
from nsa_jax.compression import check_params
from nsa_jax.config import NSAConfig
from nsa_jax.metadata import BlockSparseIndices

_HI = jax.lax.Precision.HIGHEST


def _f32(*xs):
    """The inputs in float32, or float64 if any is float64."""
    dtype = _checks.accumulation(*xs)
    return tuple(jnp.asarray(x, dtype) for x in xs)


def _positions(B: int, T: int, S, kv_len=None):
    """[B, T] key position of each query: t + (S - T)."""
    t = jnp.arange(T)[None, :]
    if kv_len is None:
        return jnp.broadcast_to(t + (S - T), (B, T))
    return t + (jnp.asarray(kv_len)[:, None] - T)


def _softmax_attend(logits, mask, v):
    """logits [B, H, G, T, L] masked by ``mask``; v [B, H, L, Dv] -> (o, lse, probabilities)."""
    s = jnp.where(mask, logits, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True, initial=-jnp.inf))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    denom = e.sum(-1, keepdims=True)
    has_key = denom > 0
    denom = jnp.where(has_key, denom, 1.0)
    p = e / denom
    o = jnp.einsum("bhgtl,bhlv->bhgtv", p, v, precision=_HI)
    lse = jnp.where(has_key, m + jnp.log(denom), -jnp.inf)[..., 0]
    return o, lse, p


def _to_heads(q, H: int):
    """[B, T, HQ, D] -> [B, H, G, T, D]."""
    B, T, HQ, D = q.shape
    return q.reshape(B, T, H, HQ // H, D).transpose(0, 2, 3, 1, 4)


def _from_heads(o):
    B, H, G, T, Dv = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H * G, Dv)


def _phi(blocks, params, which: str, config: NSAConfig):
    """phi of DESIGN.md §3 over key (or value) blocks [..., l, H, E] -> [..., H, E]."""
    l = config.compress_block
    mean = blocks.sum(axis=-3) / l
    if config.compress_method == "mean":
        return mean
    if config.compress_method == "linear":
        w = jnp.asarray(params[f"w_{which}"], blocks.dtype)  # [H, E, E]
        return jnp.einsum("...he,hef->...hf", mean, w, precision=_HI)
    p = {n: jnp.asarray(params[f"{n}_{which}"], blocks.dtype) for n in ("pos", "w1", "b1", "w2", "b2")}
    E = blocks.shape[-1]
    w1 = p["w1"].reshape(l, E, E)  # flattened (position, feature) input
    h = jnp.einsum("...lhe,lef->...hf", blocks + p["pos"][:, None, :], w1, precision=_HI)
    h = jax.nn.gelu(h + p["b1"])
    return mean + jnp.einsum("...he,ef->...hf", h, p["w2"], precision=_HI) + p["b2"]


def _packing(segment_ids, config: NSAConfig, max_segments, B: int, T: int):
    segments.check(segment_ids, B, T)
    return segments.pack(segment_ids, config, max_segments)


def compress(k, v, *, config: NSAConfig, params=None, segment_ids=None, max_segments=None):
    """Reference compression: gathers each block of keys by explicit indices, then applies phi.
    With ``segment_ids``, of the keys in the aligned layout of `segments.pack`."""
    _checks.config(config)
    if segment_ids is not None:
        packing = _packing(segment_ids, config, max_segments, *k.shape[:2])
        k, v = segments.to_aligned(k, packing), segments.to_aligned(v, packing)
    B, S, H, D = k.shape
    Dv = v.shape[3]
    check_params(config, params, H, D, Dv)
    l, d = config.compress_block, config.compress_stride
    N_c = config.num_compressed(S)
    idx = np.arange(N_c)[:, None] * d + np.arange(l)[None, :]  # [N_c, l]
    acc = _checks.accumulation(k)
    return tuple(_phi(jnp.asarray(x, acc)[:, idx], params, which, config).astype(x.dtype)
                 for x, which in ((k, "k"), (v, "v")))


def _compressed(q, k_c, v_c, config: NSAConfig, S, kv_len, bounds=None):
    """Dense compressed branch: (o [B, H, G, T, Dv], lse [B, H, G, T], p [B, H, G, T, N_c]);
    ``bounds`` = (lo, hi) [B, T]: the compressed tokens of each query's document (packed)."""
    B, T, HQ, D = q.shape
    N_c, H = k_c.shape[1], k_c.shape[2]
    q, k_c, v_c = _f32(q, k_c, v_c)
    logits = jnp.einsum("bhgtd,bnhd->bhgtn", _to_heads(q, H), k_c,
                        precision=_HI) * config.softmax_scale(D)
    i = jnp.arange(N_c)
    first_key = i * config.compress_stride
    last_key = first_key + config.compress_block - 1
    pos = _positions(B, T, S, kv_len)  # [B, T]
    if config.causal:
        visible = last_key[None, None, :] <= pos[:, :, None]  # [B, T, N_c]
    else:
        length = jnp.full((B,), S) if kv_len is None else jnp.asarray(kv_len)
        visible = jnp.broadcast_to(last_key[None, None, :] < length[:, None, None], (B, T, N_c))
    if bounds is not None:
        visible = visible & (i >= bounds[0][..., None]) & (i < bounds[1][..., None])
    return _softmax_attend(logits, visible[:, None, None], v_c.transpose(0, 2, 1, 3))


def compressed_attention(q, k_c, v_c, *, config: NSAConfig, kv_len=None, segment_ids=None,
                         max_segments=None):
    """Reference compressed branch: (o [B, T, HQ, Dv] in q.dtype, lse [B, T, HQ] float32).
    With ``segment_ids``, ``k_c``/``v_c`` come from `compress` with the same segment ids."""
    if segment_ids is not None:
        packing = _packing(segment_ids, config, max_segments, *q.shape[:2])
        q_a = segments.to_aligned(q, packing)
        bounds = segments.compressed_bounds(packing.lo, packing.hi, config)
        T_a = q_a.shape[1]
        _checks.kv_len(T_a, q.shape[0], T_a, k_c.shape[1], config, causal=config.causal)
        o, lse, _ = _compressed(q_a, k_c, v_c, config, T_a, None, bounds)
        return (segments.from_aligned(_from_heads(o).astype(q.dtype), packing),
                segments.from_aligned(_from_heads(lse[..., None])[..., 0], packing, -jnp.inf))
    S, kv_arr = _checks.kv_len(kv_len, q.shape[0], q.shape[1], k_c.shape[1], config,
                               causal=config.causal)
    o, lse, _ = _compressed(q, k_c, v_c, config, S, kv_arr)
    return _from_heads(o).astype(q.dtype), _from_heads(lse[..., None])[..., 0]


def overlap_weights(config: NSAConfig, N_c: int, N_s: int) -> np.ndarray:
    """W[i, j] = |keys(i) ∩ block j| / l, straight from the definition of the block score."""
    l, d, ls = config.compress_block, config.compress_stride, config.select_block
    W = np.zeros((N_c, N_s), np.float32)
    for i in range(N_c):
        for j in range(N_s):
            lo = max(i * d, j * ls)
            hi = min(i * d + l, (j + 1) * ls)
            W[i, j] = max(0, hi - lo) / l
    return W


def block_scores(q, k_c, *, config: NSAConfig, kv_len=None, bounds=None):
    """Selection scores [B, H, N_tiles, N_s]: compressed probability mass on each block's keys,
    summed over the G heads of a KV head and the queries of a tile (padding rows excluded).
    ``bounds``: as in `_compressed` (packed rows in the aligned layout)."""
    B, T, HQ, D = q.shape
    N_c, H = k_c.shape[1], k_c.shape[2]
    S, kv_arr = _checks.kv_len(kv_len, B, T, N_c, config, causal=config.causal)
    N_s = -(-S // config.select_block)
    qt = config.select_q_tile
    N_tiles = -(-T // qt)
    _, _, p = _compressed(q, k_c, k_c[..., :1], config, S, kv_arr, bounds)  # p [B, H, G, T, N_c]
    W = jnp.asarray(overlap_weights(config, N_c, N_s))
    per_token = jnp.einsum("bhgtn,ns->bhts", p, W, precision=_HI)  # summed over G
    tile_of_t = jnp.arange(T) // qt
    one_hot_tiles = (tile_of_t[:, None] == jnp.arange(N_tiles)[None, :]).astype(jnp.float32)
    return jnp.einsum("bhts,tu->bhus", per_token, one_hot_tiles, precision=_HI)


def _selection_rules(B: int, T: int, S, kv_len, config: NSAConfig, N_s: int, doc=None):
    """Eligible, forced and own (overlapping the tile) blocks [B, N_tiles, N_s] per query tile;
    ``doc`` = (lo, hi) [B, T]: the keys of each query's document (packed rows), whose blocks alone
    are eligible and whose first blocks are the initial ones."""
    qt, ls = config.select_q_tile, config.select_block
    N_tiles = -(-T // qt)
    pos = _positions(B, T, S, kv_len)
    first = pos[:, ::qt][:, :N_tiles]  # [B, N_tiles] position of a tile's first query
    last = pos[:, jnp.minimum(jnp.arange(N_tiles) * qt + qt - 1, T - 1)]
    j = jnp.arange(N_s)[None, None, :]
    length = jnp.full((B,), S) if kv_len is None else jnp.asarray(kv_len)
    exists = j * ls < length[:, None, None]
    first_block = 0
    if doc is not None:
        lo, hi = (x[:, ::qt][:, :N_tiles, None] for x in doc)  # the tile's first query's document
        first_block = lo // ls
        exists = (j >= first_block) & (j * ls < hi)
    eligible = exists & ((j * ls <= last[..., None]) if config.causal else True)
    forced = j < first_block + config.num_initial
    overlaps_tile = (j >= first[..., None] // ls) & (j <= last[..., None] // ls)
    if config.num_local >= 1:
        just_before = (j < first[..., None] // ls) & (j >= first[..., None] // ls - (config.num_local - 1))
        forced = forced | overlaps_tile | just_before
    else:
        overlaps_tile = jnp.zeros_like(overlaps_tile)
    return eligible, forced & eligible, overlaps_tile & eligible


def select_blocks(q, k_c, *, config: NSAConfig, lse=None, kv_len=None, segment_ids=None,
                  max_segments=None) -> BlockSparseIndices:
    """Reference selection: stable descending sort of (own block, other forced block, score),
    lower block id on ties. A tile's own blocks outrank other forced blocks, which matters only
    when a tile straddling a block boundary (decode offset) forces more than n blocks.

    ``lse`` is accepted for signature parity; the reference recomputes the probabilities. With
    ``segment_ids`` the tiles and block ids are those of the aligned layout (`segments.pack`).
    """
    del lse
    doc = c_bounds = None
    if segment_ids is not None:
        packing = _packing(segment_ids, config, max_segments, *q.shape[:2])
        q, kv_len = segments.to_aligned(q, packing), None
        doc = (packing.lo, packing.hi)
        c_bounds = segments.compressed_bounds(*doc, config)
    B, T, HQ, D = q.shape
    N_c = k_c.shape[1]
    S, kv_arr = _checks.kv_len(kv_len, B, T, N_c, config, causal=config.causal)
    N_s = -(-S // config.select_block)
    n = config.num_selected
    scores = jax.lax.stop_gradient(block_scores(q, k_c, config=config, kv_len=kv_len,
                                                bounds=c_bounds))
    eligible, forced, own = (m[:, None] for m in _selection_rules(B, T, S, kv_arr, config, N_s, doc))
    # Rank 0: own blocks, 1: other forced blocks, 2: eligible by score, 3: not selectable.
    rank = jnp.where(own, 0, jnp.where(forced, 1, jnp.where(eligible, 2, 3)))
    rank = jnp.broadcast_to(rank, scores.shape)
    by_score = jnp.where(rank == 2, -scores, 0.0)  # forced blocks are not ordered by score
    order = jnp.lexsort((by_score, rank), axis=-1)[..., :n]  # stable: ties keep the lower id
    chosen = jnp.take_along_axis(rank, order, axis=-1) < 3
    ids = jnp.sort(jnp.where(chosen, order, N_s), axis=-1)
    ids = jnp.where(ids < N_s, ids, -1)
    if ids.shape[-1] < n:
        ids = jnp.pad(ids, [(0, 0)] * 3 + [(0, n - ids.shape[-1])], constant_values=-1)
    return BlockSparseIndices(ids.astype(jnp.int32), chosen.sum(-1).astype(jnp.int32),
                              q_tile=config.select_q_tile, block_size=config.select_block)


def selected_token_mask(sel, B: int, T: int, S: int, H: int, block_size: int):
    """bool [B, H, T, S]: key s belongs to a block selected for query t (no causal rule)."""
    if isinstance(sel, BlockSparseIndices):
        ids, block_size = sel.indices, sel.block_size  # [B, H, N_tiles, k]
        tile_of_t = jnp.arange(T) // sel.q_tile
        ids = ids[:, :, tile_of_t]  # [B, H, T, k]
    else:
        ids = jnp.moveaxis(jnp.asarray(sel), 1, 2)  # [B, T, H, n] -> [B, H, T, n]
    block_of_s = jnp.arange(S) // block_size
    return (ids[..., None] == block_of_s).any(axis=-2)  # -1 never matches


def _dense_branch(q, k, v, mask, config: NSAConfig):
    """Attention of q over k, v under a dense [B, H or 1, T, S] mask -> [B, T, HQ, Dv]."""
    H = k.shape[2]
    qf, kf, vf = _f32(q, k, v)
    logits = jnp.einsum("bhgtd,bshd->bhgts", _to_heads(qf, H), kf,
                        precision=_HI) * config.softmax_scale(q.shape[-1])
    o, _, _ = _softmax_attend(logits, mask[:, :, None], vf.transpose(0, 2, 1, 3))
    return _from_heads(o).astype(q.dtype)


def _causal_mask(T: int, S: int):
    pos = jnp.arange(T)[:, None] + (S - T)
    return pos >= jnp.arange(S)[None, :]


def _packed_branch(branch, q, k, v, config: NSAConfig, segment_ids, max_segments, *args):
    """``branch(q, k, v, *args, doc=(lo, hi))`` in the aligned layout, back in token layout."""
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    if S != T:
        raise ValueError(f"segment_ids need S == T (packed self-attention), got T={T}, S={S}")
    packing = _packing(segment_ids, config, max_segments, B, T)
    q, k, v = (segments.to_aligned(x, packing) for x in (q, k, v))
    return segments.from_aligned(branch(q, k, v, *args, doc=(packing.lo, packing.hi)), packing)


def _doc_mask(doc, S: int):
    """bool [B, 1, T, S]: key s lies in query t's document."""
    s = jnp.arange(S)
    return ((s >= doc[0][..., None]) & (s < doc[1][..., None]))[:, None]


def selected_attention(q, k, v, sel, *, config: NSAConfig, segment_ids=None, max_segments=None):
    """Reference selected branch; ``sel`` is `BlockSparseIndices` or per-token int32[B, T, H, n]
    (with ``segment_ids``, from `select_blocks` with the same segment ids)."""
    if segment_ids is not None:
        return _packed_branch(functools.partial(_selected, config=config), q, k, v, config,
                              segment_ids, max_segments, sel)
    return _selected(q, k, v, sel, config=config)


def _selected(q, k, v, sel, *, config: NSAConfig, doc=None):
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal, wide=True)
    mask = selected_token_mask(sel, B, T, S, H, config.select_block)
    if config.causal:
        mask = mask & _causal_mask(T, S)
    if doc is not None:
        mask = mask & _doc_mask(doc, S)
    return _dense_branch(q, k, v, mask, config)


def sliding_window_attention(q, k, v, *, config: NSAConfig, segment_ids=None, max_segments=None):
    """Reference window branch: causal keys t - w < s <= t, non-causal |s - t| < w (inside each
    document with ``segment_ids``)."""
    if segment_ids is not None:
        return _packed_branch(functools.partial(_window, config=config), q, k, v, config,
                              segment_ids, max_segments)
    return _window(q, k, v, config=config)


def _window(q, k, v, *, config: NSAConfig, doc=None):
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal, wide=True)
    if config.window == 0:
        return jnp.zeros((B, T, HQ, Dv), q.dtype)
    diff = (jnp.arange(T)[:, None] + (S - T)) - jnp.arange(S)[None, :]
    if config.causal:
        mask = (diff >= 0) & (diff < config.window)
    else:
        mask = jnp.abs(diff) < config.window
    mask = mask[None, None]
    if doc is not None:
        mask = mask & _doc_mask(doc, S)
    return _dense_branch(q, k, v, mask, config)


def gate_and_combine(o_c, o_s, o_w, g=None):
    """o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa; g=None weighs each branch 1/3."""
    branches = jnp.stack(_f32(o_c, o_s, o_w), axis=-1)  # [B, T, HQ, Dv, 3]
    if g is None:
        weights = jnp.full((3,), 1.0 / 3.0)
        out = jnp.einsum("bthvc,c->bthv", branches, weights, precision=_HI)
    else:
        out = jnp.einsum("bthvc,bthc->bthv", branches, jnp.asarray(g, branches.dtype), precision=_HI)
    return out.astype(o_c.dtype)


def _packed_nsa_attention(q, k, v, g, segment_ids, config: NSAConfig, params):
    """NSA over packed documents (DESIGN.md §3, Variable length), straight from the rules.

    Every key position ``a`` may anchor a compressed token (if it starts a stride of its document
    and the token's l keys stay inside it) and a selection block (if it starts an l'-block of its
    document); query tiles start every ``select_q_tile`` tokens of a document. Masks over
    [T, T] then restrict each rule to the query's own document.
    """
    B, T, HQ, D = q.shape
    H, Dv = k.shape[2], v.shape[3]
    l, d, ls = config.compress_block, config.compress_stride, config.select_block
    qt, n, w = config.select_q_tile, config.num_selected, config.window
    run, start, pos, length, pad = segments.layout(segment_ids)
    t = jnp.arange(T)
    real = ~pad
    same = (run[:, :, None] == run[:, None, :]) & real[:, :, None] & real[:, None, :]  # [B, T, T]
    before = t[:, None] >= t[None, :]  # key at or before the query

    # Compression: token anchored at a covers keys a .. a + l - 1.
    anchors_c = real & (pos % d == 0) & (pos + l <= length)  # [B, T]
    idx = jnp.minimum(t[:, None] + jnp.arange(l)[None, :], T - 1)  # [T, l]
    acc = _checks.accumulation(k)
    k_c = _phi(jnp.asarray(k, acc)[:, idx], params, "k", config)  # [B, T, H, D]
    v_c = _phi(jnp.asarray(v, acc)[:, idx], params, "v", config)
    qf, k_c, v_c = _f32(q, k_c, v_c)
    scale = config.softmax_scale(D)
    last_key = t + l - 1  # [T]
    vis_c = same & anchors_c[:, None, :]
    if config.causal:
        vis_c = vis_c & (last_key[None, None, :] <= t[None, :, None])
    logits = jnp.einsum("bhgtd,bahd->bhgta", _to_heads(qf, H), k_c, precision=_HI) * scale
    o_c, _, p = _softmax_attend(logits, vis_c[:, None, None], v_c.transpose(0, 2, 1, 3))

    # Scores: compressed mass on each block's keys, summed over the group and the tile.
    anchors_s = real & (pos % ls == 0)  # [B, T]
    lo = jnp.maximum(t[:, None], t[None, :])  # [a, b]
    hi = jnp.minimum(t[:, None] + l, t[None, :] + ls)
    overlap = jnp.maximum(hi - lo, 0) / l  # [T_a, T_b], same document ensured by p
    per_query = jnp.einsum("bhgta,ac->bhtc", jax.lax.stop_gradient(p), overlap.astype(p.dtype),
                           precision=_HI)
    tile = start + (pos // qt) * qt  # [B, T] first query of each query's tile
    in_tile = (tile[:, :, None] == t[None, None, :]) & real[:, :, None]  # [B, T_query, T_tile]
    scores = jnp.einsum("bhtc,btu->bhuc", per_query, in_tile.astype(p.dtype), precision=_HI)

    # Selection per tile u (rows of tiles that do not exist are never used).
    tile_last = jnp.minimum(t[None] + qt - 1, start + length - 1)  # [B, T], for u starting a tile
    eligible = same & anchors_s[:, None, :]  # [B, u, b]
    if config.causal:
        eligible = eligible & (t[None, None, :] <= tile_last[:, :, None])
    block = (t[None] - start) // ls  # [B, T] document-local block of each anchor
    first_blk = (pos // ls)[:, :, None]
    last_blk = ((tile_last - start) // ls)[:, :, None]
    blk = block[:, None, :]
    forced = blk < config.num_initial
    own = (blk >= first_blk) & (blk <= last_blk)
    if config.num_local >= 1:
        forced = forced | ((blk >= first_blk - (config.num_local - 1)) & (blk <= last_blk))
    else:
        own = jnp.zeros_like(own)
    forced, own = forced & eligible, own & eligible
    key = jnp.where(eligible[:, None], scores, -jnp.inf)
    key = jnp.where(forced[:, None], jnp.finfo(jnp.float32).max, key)
    key = jnp.where(own[:, None], jnp.inf, key)  # [B, H, u, b]
    vals, ids = jax.lax.top_k(key, min(n, T))
    picked = (jnp.arange(T)[None, None, None, :, None] == ids[..., None, :]) & (vals > -jnp.inf)[..., None, :]
    selected_ub = picked.any(-1)  # [B, H, u, b]

    # Selected branch: keys of the tile's selected blocks, in the document, causal.
    anchor_of = start + ((t[None] - start) // ls) * ls  # [B, T] block anchor of each key
    sel_tb = jnp.take_along_axis(selected_ub, tile[:, None, :, None], axis=2)  # [B, H, T, T_b]
    sel_ts = jnp.take_along_axis(sel_tb, jnp.broadcast_to(anchor_of[:, None, None, :],
                                                          (B, H, T, T)), axis=3)  # [B, H, T, T_s]
    mask_s = sel_ts & same[:, None]
    if config.causal:
        mask_s = mask_s & before
    o_s = _dense_branch(q, k, v, mask_s, config)

    # Window: the document's keys within w.
    diff = t[:, None] - t[None, :]
    win = (diff >= 0) & (diff < w) if config.causal else jnp.abs(diff) < w
    o_w = (_dense_branch(q, k, v, (same & win)[:, None], config) if w
           else jnp.zeros((B, T, HQ, Dv), q.dtype))
    o_c = _from_heads(o_c).astype(q.dtype)
    out = gate_and_combine(o_c, o_s, o_w, g)
    return jnp.where(pad[:, :, None, None], 0, out)


def nsa_attention(q, k, v, g=None, *, config: NSAConfig, segment_ids=None, compress_params=None):
    """Reference NSA: compress, compressed branch, top-n selection, selected and window branches,
    gated sum. With ``segment_ids`` [B, T] (S == T), each document (a run of one non-zero id)
    gives what it would give alone; id 0 is padding, with zero output."""
    _checks.config(config)
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal, wide=True)
    _checks.gates(g, B, T, HQ, wide=True)
    if segment_ids is not None:
        segments.check(segment_ids, B, T)
        if S != T:
            raise ValueError(f"segment_ids need S == T (packed self-attention), got T={T}, S={S}")
        check_params(config, compress_params, H, D, Dv)
        return _packed_nsa_attention(q, k, v, g, segment_ids, config, compress_params)
    k_c, v_c = compress(k, v, config=config, params=compress_params)
    o_c, lse_c = compressed_attention(q, k_c, v_c, config=config, kv_len=S)
    sel = select_blocks(q, k_c, config=config, lse=lse_c, kv_len=S)
    o_s = selected_attention(q, k, v, sel, config=config)
    o_w = sliding_window_attention(q, k, v, config=config)
    return gate_and_combine(o_c, o_s, o_w, g)
