"""Dense jnp reference for every NSA piece and their composition (docs/design.md §3).

Written for clarity, not speed: float32 throughout (float64 for float64 inputs, so that gradients
can be checked by finite differences), ``precision=HIGHEST``, and masks over the full
[T, S] (or [T, N_c]) grid built straight from the rules in docs/design.md. Every other implementation
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
    """phi of docs/design.md §3 over key (or value) blocks [..., l, H, E] -> [..., H, E]."""
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


def _packing(segment_ids, config: NSAConfig, max_segments, B: int, T: int, S: int | None = None,
             kv_len=None):
    """The aligned layout of validated ``segment_ids`` (None without them)."""
    _checks.packed(segment_ids, max_segments, B, T, T if S is None else S, kv_len)
    return None if segment_ids is None else segments.pack(segment_ids, config, max_segments)


def compress(k, v, *, config: NSAConfig, params=None, segment_ids=None, max_segments=None):
    """Reference compression: gathers each block of keys by explicit indices, then applies phi.
    With ``segment_ids``, of the keys in the aligned layout of `segments.pack`."""
    _checks.config(config)
    _checks.rank("k", k, 4, "[B, S, H, D]")
    _checks.rank("v", v, 4, "[B, S, H, Dv]")
    check_params(config, params, k.shape[2], k.shape[3], v.shape[3])
    packing = _packing(segment_ids, config, max_segments, *k.shape[:2])
    if packing is not None:
        k, v = packing.align(k), packing.align(v)
    return _compress(k, v, config, params)


def _compress(k, v, config: NSAConfig, params):
    l, d = config.compress_block, config.compress_stride
    N_c = config.num_compressed(k.shape[1])
    idx = np.arange(N_c)[:, None] * d + np.arange(l)[None, :]  # [N_c, l]
    acc = _checks.accumulation(k)
    return tuple(_phi(jnp.asarray(x, acc)[:, idx], params, which, config).astype(x.dtype)
                 for x, which in ((k, "k"), (v, "v")))


def _compressed(q, k_c, v_c, config: NSAConfig, S, kv_len, bounds=None):
    """Dense compressed branch: (o [B, H, G, T, Dv], lse [B, H, G, T], p [B, H, G, T, N_c]);
    ``bounds``: `segments.CompressedBounds`, the compressed tokens of each query's document."""
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
    _checks.config(config)
    B, T = _checks.compressed_inputs(q, k_c, v_c, wide=True)[:2]
    packing = _packing(segment_ids, config, max_segments, B, T, kv_len=kv_len)

    def body(q, key_bounds):
        T_k = q.shape[1]
        S, kv_arr = _checks.kv_len(T_k if key_bounds is not None else kv_len, B, T_k,
                                   k_c.shape[1], config, causal=config.causal)
        o, lse, _ = _compressed(q, k_c, v_c, config, S, kv_arr,
                                key_bounds and key_bounds.compressed(config))
        return _from_heads(o).astype(q.dtype), _from_heads(lse[..., None])[..., 0]

    return segments.in_documents(packing, body, q, fill=(0, -jnp.inf))


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
    ``bounds``: `segments.CompressedBounds` (packed rows in the aligned layout)."""
    B, T, HQ, D = q.shape
    N_c = k_c.shape[1]
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
    ``doc``: `segments.KeyBounds`, the keys of each query's document (packed rows), whose blocks
    alone are eligible and whose first blocks are the initial ones."""
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

    ``lse`` is validated for signature parity; the reference recomputes the probabilities. With
    ``segment_ids`` the tiles and block ids are those of the aligned layout (`segments.pack`).
    """
    _checks.config(config)
    B, T, HQ = _checks.compressed_inputs(q, k_c, wide=True)[:3]
    _checks.lse(lse, B, T, HQ)
    packing = _packing(segment_ids, config, max_segments, B, T, kv_len=kv_len)
    return segments.in_documents(packing, functools.partial(
        _select, k_c=k_c, config=config, kv_len=kv_len), q, fill=None)


def _select(q, key_bounds, *, k_c, config: NSAConfig, kv_len) -> BlockSparseIndices:
    doc = key_bounds
    c_bounds = None if doc is None else doc.compressed(config)
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
    # Every operand of the sort in the scores' sharding (jnp.lexsort's own iota has none, which
    # an explicit mesh refuses).
    sharding = jax.typeof(scores).sharding
    rank = jnp.broadcast_to(rank, scores.shape, out_sharding=sharding)
    by_score = jnp.where(rank == 2, -scores, 0.0)  # forced blocks are not ordered by score
    ids = jax.lax.broadcasted_iota(jnp.int32, scores.shape, 3, out_sharding=sharding)
    # Stable: ties keep the lower id.
    order = jax.lax.sort((rank, by_score, ids), dimension=3, num_keys=2)[-1][..., :n]
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
        k = sel.indices.shape[-1]
        used = jnp.arange(k) < jnp.clip(sel.counts, 0, k)[..., None]  # entries past counts: unused
        ids, block_size = jnp.where(used, sel.indices, -1), sel.block_size  # [B, H, N_tiles, k]
        tile_of_t = jnp.arange(T) // sel.q_tile
        ids = ids[:, :, tile_of_t]  # [B, H, T, k]
    else:
        ids = jnp.moveaxis(jnp.asarray(sel), 1, 2)  # [B, T, H, n] -> [B, H, T, n]
    block_of_s = jnp.arange(S) // block_size
    return (ids[..., None] == block_of_s).any(axis=-2)  # ids outside [0, N_s) never match


def _dense_branch(q, k, v, mask, config: NSAConfig):
    """Attention of q over k, v under a dense [B, H or 1, T, S] mask -> [B, T, HQ, Dv]."""
    H = k.shape[2]
    qf, kf, vf = _f32(q, k, v)
    logits = jnp.einsum("bhgtd,bshd->bhgts", _to_heads(qf, H), kf,
                        precision=_HI) * config.softmax_scale(q.shape[-1])
    o, _, _ = _softmax_attend(logits, mask[:, :, None], vf.transpose(0, 2, 1, 3))
    return _from_heads(o).astype(q.dtype)


def _doc_mask(doc, S: int):
    """bool [B, 1, T, S]: key s lies in query t's document."""
    s = jnp.arange(S)
    return ((s >= doc[0][..., None]) & (s < doc[1][..., None]))[:, None]


def selected_attention(q, k, v, sel, *, config: NSAConfig, kv_len=None, segment_ids=None,
                       max_segments=None):
    """Reference selected branch; ``sel`` is `BlockSparseIndices` or per-token int32[B, T, H, n]
    (with ``segment_ids``, from `select_blocks` with the same segment ids). ``kv_len``: keys per
    row (int or int32[B]), default S."""
    _checks.config(config)
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal, wide=True)
    packing = _packing(segment_ids, config, max_segments, B, T, S, kv_len)
    _checks.selection(sel, B, T if packing is None else packing.length, H, packing is not None)
    kv_len = _checks.key_lengths(kv_len, B, T, S, causal=config.causal)
    return segments.in_documents(
        packing, functools.partial(_selected, sel=sel, config=config, kv_len=kv_len), q, k, v)


def _key_mask(B: int, T: int, S: int, kv_len):
    """(bool [B, 1, 1, S] keys a row holds, int [B, 1, T, 1] query positions)."""
    length = jnp.full((B,), S) if kv_len is None else jnp.asarray(kv_len)
    held = (jnp.arange(S)[None, :] < length[:, None])[:, None, None, :]
    return held, _positions(B, T, S, kv_len)[:, None, :, None]


def _selected(q, k, v, doc, *, sel, config: NSAConfig, kv_len=None):
    B, T, HQ = q.shape[:3]
    S, H = k.shape[1], k.shape[2]
    held, pos = _key_mask(B, T, S, kv_len)
    mask = selected_token_mask(sel, B, T, S, H, config.select_block) & held
    if config.causal:
        mask = mask & (pos >= jnp.arange(S))
    if doc is not None:
        mask = mask & _doc_mask(doc, S)
    return _dense_branch(q, k, v, mask, config)


def sliding_window_attention(q, k, v, *, config: NSAConfig, kv_len=None, segment_ids=None,
                             max_segments=None):
    """Reference window branch: causal keys p - w < s <= p for the query at key position p,
    non-causal |s - p| < w (inside each document with ``segment_ids``); ``kv_len`` as in
    `selected_attention`."""
    _checks.config(config)
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal, wide=True)
    packing = _packing(segment_ids, config, max_segments, B, T, S, kv_len)
    kv_len = _checks.key_lengths(kv_len, B, T, S, causal=config.causal)
    return segments.in_documents(
        packing, functools.partial(_window, config=config, kv_len=kv_len), q, k, v)


def _window(q, k, v, doc, *, config: NSAConfig, kv_len=None):
    B, T, HQ = q.shape[:3]
    S, Dv = k.shape[1], v.shape[3]
    w = _checks.effective(config, S, T).window
    if w == 0:
        return jnp.zeros((B, T, HQ, Dv), q.dtype)
    held, pos = _key_mask(B, T, S, kv_len)
    diff = pos - jnp.arange(S)
    mask = held & ((diff >= 0) & (diff < w) if config.causal else jnp.abs(diff) < w)
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


def nsa_attention(q, k, v, g=None, *, config: NSAConfig, segment_ids=None, compress_params=None,
                  max_segments=None):
    """Reference NSA: compress, compressed branch, top-n selection, selected and window branches,
    gated sum. With ``segment_ids`` [B, T] (S == T), each document (a run of one non-zero id)
    gives what it would give alone; id 0 is padding, with zero output."""
    _checks.config(config)
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal, wide=True)
    _checks.gates(g, B, T, HQ, wide=True)
    check_params(config, compress_params, H, D, Dv)
    packing = _packing(segment_ids, config, max_segments, B, T, S)
    return segments.in_documents(
        packing, functools.partial(_nsa, config=config, params=compress_params), q, k, v, g)


def _nsa(q, k, v, g, doc, *, config: NSAConfig, params):
    S = k.shape[1]
    k_c, v_c = _compress(k, v, config, params)
    o, _, _ = _compressed(q, k_c, v_c, config, S, None, doc and doc.compressed(config))
    o_c = _from_heads(o).astype(q.dtype)
    sel = _select(q, doc, k_c=k_c, config=config, kv_len=S)
    o_s = _selected(q, k, v, doc, sel=sel, config=config)
    o_w = _window(q, k, v, doc, config=config)
    return gate_and_combine(o_c, o_s, o_w, g)
