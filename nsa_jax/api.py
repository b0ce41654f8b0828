"""Public NSA functions: validate inputs, then dispatch on ``implementation``."""

from __future__ import annotations

import jax.numpy as jnp

from nsa_jax import _checks, metadata, reference, segments
from nsa_jax.ops import triton as pallas_triton, xla
from nsa_jax.compression import compress
from nsa_jax.config import NSAConfig
from nsa_jax.metadata import BlockSparseIndices


def _packing(segment_ids, config: NSAConfig, max_segments, B: int, T: int, S: int):
    """The aligned layout of ``segment_ids`` (validated) for self-attention over T tokens."""
    segments.check(segment_ids, B, T)
    if S != T:
        raise ValueError(f"segment_ids need S == T (packed self-attention), got T={T}, S={S}")
    if max_segments is not None and (isinstance(max_segments, bool) or not isinstance(max_segments, int)
                                     or max_segments < 1):
        raise ValueError(f"max_segments={max_segments!r} must be a positive int or None")
    return segments.pack(segment_ids, config, max_segments)


def _backend(impl: str, interpret: bool, tilings):
    """(module, keyword arguments) running the branches of ``impl`` ("xla" or "triton")."""
    if impl == "triton":
        pallas_triton.check_available(interpret)
        return pallas_triton, dict(interpret=interpret, tilings=tilings)
    return xla, {}


def _compressed_inputs(q, k_c, v_c=None):
    _checks.rank("q", q, 4, "[B, T, HQ, D]")
    _checks.rank("k_c", k_c, 4, "[B, N_c, H, D]")
    _checks.floating("q", q)
    _checks.floating("k_c", k_c)
    arrays = {"q": q, "k_c": k_c}
    if v_c is not None:
        _checks.rank("v_c", v_c, 4, "[B, N_c, H, Dv]")
        _checks.floating("v_c", v_c)
        arrays["v_c"] = v_c
        if v_c.shape[:3] != k_c.shape[:3]:
            raise ValueError(f"k_c and v_c must agree on [B, N_c, H]: k_c {k_c.shape}, v_c {v_c.shape}")
    _checks.same_dtype(**arrays)
    if k_c.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape}, k_c {k_c.shape}")
    if k_c.shape[3] != q.shape[3]:
        raise ValueError(f"q and k_c must have the same head dim D: q {q.shape}, k_c {k_c.shape}")
    _checks.heads(q.shape[2], k_c.shape[2])


def compressed_attention(q, k_c, v_c, *, config: NSAConfig, kv_len=None, implementation=None,
                         interpret: bool = False, tilings=None, segment_ids=None,
                         max_segments: int | None = None):
    """Attention of every query over the compressed tokens it may see.

    Args:
      q: [B, T, HQ, D] queries. k_c, v_c: [B, N_c, H, D] and [B, N_c, H, Dv] from `compress`.
      config: `NSAConfig`.
      kv_len: key length S the compressed tokens came from (int or int32[B]); default T. Query t
        sits at key position t + (S - T).
      implementation: None ("triton" on a GPU, "xla" elsewhere), "xla", "reference" or "triton"
        ("mosaic" once its kernels land).
      interpret: run Pallas kernels in interpret mode (ignored by "xla" and "reference").
      tilings: `TritonTilings` for the "triton" kernels (speed only); None picks the default for
        the GPU generation. Every function below takes the same ``interpret`` and ``tilings``.
      segment_ids, max_segments: packed documents, as in `nsa_attention` (then kv_len must be
        None, and k_c, v_c come from `compress` with the same segment ids). Every function below
        takes them; each document gives what it gives alone.

    Returns:
      o [B, T, HQ, Dv] in q.dtype (zero where no compressed token is visible) and
      lse [B, T, HQ] float32 (-inf there).
    """
    _checks.config(config)
    impl = _checks.implementation(implementation)
    _checks.tilings(tilings)
    _compressed_inputs(q, k_c, v_c)
    if segment_ids is not None:
        return _packed_compressed(q, k_c, v_c, config, kv_len, segment_ids, max_segments, impl,
                                  interpret, tilings)
    if impl == "reference":
        return reference.compressed_attention(q, k_c, v_c, config=config, kv_len=kv_len)
    B, T = q.shape[:2]
    S, kv_arr = _checks.kv_len(kv_len, B, T, k_c.shape[1], config, causal=config.causal)
    if T == 0:
        return (jnp.zeros((*q.shape[:3], v_c.shape[3]), q.dtype),
                jnp.full(q.shape[:3], -jnp.inf, jnp.float32))
    if impl == "triton" and implementation is None and not pallas_triton.supports_compressed(config, kv_arr):
        impl = "xla"  # the one case the Triton kernels do not cover yet; same semantics
    if impl == "triton":
        pallas_triton.check_available(interpret)
        return pallas_triton.compressed_attention(q, k_c, v_c, config, S, kv_arr, interpret, tilings)
    return xla.compressed_attention(q, k_c, v_c, config, S, kv_arr)


def _packed_compressed(q, k_c, v_c, config, kv_len, segment_ids, max_segments, impl, interpret,
                       tilings):
    if kv_len is not None:
        raise ValueError("kv_len must be None with segment_ids (packed self-attention)")
    B, T = q.shape[:2]
    if impl == "reference":
        return reference.compressed_attention(q, k_c, v_c, config=config, segment_ids=segment_ids,
                                              max_segments=max_segments)
    packing = _packing(segment_ids, config, max_segments, B, T, T)
    q_a = segments.to_aligned(q, packing)
    T_a = q_a.shape[1]
    _checks.kv_len(T_a, B, T_a, k_c.shape[1], config, causal=config.causal)
    mod, kw = _backend(impl, interpret, tilings)
    bounds = segments.compressed_bounds(packing.lo, packing.hi, config)
    o, lse = mod.compressed_attention(q_a, k_c, v_c, config, T_a, None, bounds=bounds, **kw)
    return segments.from_aligned(o, packing), segments.from_aligned(lse, packing, -jnp.inf)


def select_blocks(q, k_c, *, config: NSAConfig, lse=None, kv_len=None, implementation=None,
                  interpret: bool = False, tilings=None, segment_ids=None,
                  max_segments: int | None = None) -> BlockSparseIndices:
    """Top-n selection blocks per (batch, KV head, query tile), shared by the G heads of a group.

    Args:
      q: [B, T, HQ, D]. k_c: [B, N_c, H, D].
      lse: optional [B, T, HQ] log-sum-exp from `compressed_attention`, saving its recomputation.
      kv_len: as in `compressed_attention`.

    Returns:
      `BlockSparseIndices` with indices int32[B, H, ceil(T / select_q_tile), num_selected]. Not
      differentiable (selection is discrete; gradients flow through the compressed branch).
      With ``segment_ids`` the tiles and block ids are those of the aligned layout (T_a rows, see
      `compress`), ready for `selected_attention` with the same segment ids.
    """
    _checks.config(config)
    impl = _checks.implementation(implementation)
    _checks.tilings(tilings)
    _compressed_inputs(q, k_c)
    B, T, HQ = q.shape[:3]
    if lse is not None and tuple(getattr(lse, "shape", ())) != (B, T, HQ):
        raise ValueError(f"lse must have shape [B, T, HQ] = {(B, T, HQ)}, got {getattr(lse, 'shape', lse)}")
    if segment_ids is not None:
        if kv_len is not None:
            raise ValueError("kv_len must be None with segment_ids (packed self-attention)")
        if impl == "reference":
            return reference.select_blocks(q, k_c, config=config, segment_ids=segment_ids,
                                           max_segments=max_segments)
        packing = _packing(segment_ids, config, max_segments, B, T, T)
        q_a = segments.to_aligned(q, packing)
        T_a = q_a.shape[1]
        _checks.kv_len(T_a, B, T_a, k_c.shape[1], config, causal=config.causal)
        lse_a = None if lse is None else segments.to_aligned(lse, packing)
        mod, kw = _backend(impl, interpret, tilings)
        return mod.select_blocks(q_a, k_c, config, T_a, None, lse_a,
                                 bounds=(packing.lo, packing.hi), **kw)
    if impl == "reference":
        return reference.select_blocks(q, k_c, config=config, lse=lse, kv_len=kv_len)
    S, kv_arr = _checks.kv_len(kv_len, B, T, k_c.shape[1], config, causal=config.causal)
    if T == 0:
        H, n = k_c.shape[2], config.num_selected
        return BlockSparseIndices(jnp.full((B, H, 0, n), -1, jnp.int32), jnp.zeros((B, H, 0), jnp.int32),
                                  q_tile=config.select_q_tile, block_size=config.select_block)
    if impl == "triton":
        pallas_triton.check_available(interpret)
        return pallas_triton.select_blocks(q, k_c, config, S, kv_arr, lse, interpret, tilings)
    return xla.select_blocks(q, k_c, config, S, kv_arr, lse)


def _selection(sel, B: int, T: int, H: int, config: NSAConfig) -> BlockSparseIndices:
    if isinstance(sel, BlockSparseIndices):
        want = (B, H, -(-T // sel.q_tile))
        if tuple(sel.indices.shape[:3]) != want or tuple(sel.counts.shape) != want:
            raise ValueError(f"BlockSparseIndices must have indices [B, H, N_tiles, k] and counts "
                             f"[B, H, N_tiles] with (B, H, N_tiles) = {want} (q_tile={sel.q_tile}), got "
                             f"indices {sel.indices.shape}, counts {sel.counts.shape}")
        return sel
    shape = tuple(getattr(sel, "shape", ()))
    if len(shape) != 4 or shape[:3] != (B, T, H):
        raise ValueError(f"per-token indices must have shape [B, T, H, n] with (B, T, H) = "
                         f"{(B, T, H)}, got {shape or type(sel).__name__}")
    return metadata.from_per_token(sel, config.select_block)


def selected_attention(q, k, v, sel, *, config: NSAConfig, implementation=None,
                       interpret: bool = False, tilings=None, segment_ids=None,
                       max_segments: int | None = None):
    """Attention of each query over the keys of its tile's selected blocks (causal within them).

    Args:
      q: [B, T, HQ, D], k: [B, S, H, D], v: [B, S, H, Dv].
      sel: `BlockSparseIndices` (e.g. from `select_blocks`) or per-token int32[B, T, H, n] block
        ids of size ``config.select_block`` (-1 entries ignored). Used exactly as given.

    Returns:
      [B, T, HQ, Dv] in q.dtype; a query with no visible selected key gets zeros.
    """
    _checks.config(config)
    impl = _checks.implementation(implementation)
    _checks.tilings(tilings)
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal)
    if segment_ids is not None:
        packing = _packing(segment_ids, config, max_segments, B, T, S)
        if not isinstance(sel, BlockSparseIndices):
            raise TypeError("with segment_ids, sel must be the BlockSparseIndices of select_blocks "
                            f"(aligned layout), got {type(sel).__name__}")
        _selection(sel, B, packing.lo.shape[1], H, config)
        if impl == "reference":
            return reference.selected_attention(q, k, v, sel, config=config,
                                                segment_ids=segment_ids, max_segments=max_segments)
        mod, kw = _backend(impl, interpret, tilings)
        q_a, k_a, v_a = (segments.to_aligned(x, packing) for x in (q, k, v))
        # Causal rows never see past their document's end; non-causal ones must be told.
        bounds = None if config.causal else (packing.lo, packing.hi)
        return segments.from_aligned(mod.selected_attention(q_a, k_a, v_a, sel, config,
                                                            bounds=bounds, **kw), packing)
    sel_bsi = _selection(sel, B, T, H, config)
    if impl == "reference":
        return reference.selected_attention(q, k, v, sel, config=config)
    if T == 0:
        return jnp.zeros((B, T, HQ, Dv), q.dtype)
    if impl == "triton" and implementation is None and not pallas_triton.supports_block(sel_bsi.block_size):
        impl = "xla"  # the one case the Triton kernels do not cover yet; same semantics
    if impl == "triton":
        pallas_triton.check_available(interpret)
        return pallas_triton.selected_attention(q, k, v, sel_bsi, config, interpret, tilings)
    return xla.selected_attention(q, k, v, sel_bsi, config)


def sliding_window_attention(q, k, v, *, config: NSAConfig, implementation=None,
                             interpret: bool = False, tilings=None, segment_ids=None,
                             max_segments: int | None = None):
    """Sliding-window branch: causal keys t - w < s <= t; non-causal |s - t| < w.

    Returns [B, T, HQ, Dv] in q.dtype; zeros when ``config.window == 0``.
    """
    _checks.config(config)
    impl = _checks.implementation(implementation)
    _checks.tilings(tilings)
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal)
    if segment_ids is not None:
        packing = _packing(segment_ids, config, max_segments, B, T, S)
        if impl == "reference":
            return reference.sliding_window_attention(q, k, v, config=config,
                                                      segment_ids=segment_ids,
                                                      max_segments=max_segments)
        if T == 0 or config.window == 0:
            return jnp.zeros((B, T, HQ, Dv), q.dtype)
        mod, kw = _backend(impl, interpret, tilings)
        q_a, k_a, v_a = (segments.to_aligned(x, packing) for x in (q, k, v))
        return segments.from_aligned(mod.sliding_window_attention(
            q_a, k_a, v_a, config, bounds=(packing.lo, packing.hi), **kw), packing)
    if impl == "reference":
        return reference.sliding_window_attention(q, k, v, config=config)
    if T == 0 or S == 0 or config.window == 0:
        return jnp.zeros((B, T, HQ, Dv), q.dtype)
    if impl == "triton":
        pallas_triton.check_available(interpret)
        return pallas_triton.sliding_window_attention(q, k, v, config, interpret, tilings)
    return xla.sliding_window_attention(q, k, v, config)


def gate_and_combine(o_c, o_s, o_w, g=None):
    """o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa (float32 sum, result in o_c.dtype).

    Args:
      o_c, o_s, o_w: [B, T, HQ, Dv] branch outputs.
      g: [B, T, HQ, 3] gates in [0, 1] (order: compressed, selected, window); None = 1/3 each.
    """
    for name, o in (("o_c", o_c), ("o_s", o_s), ("o_w", o_w)):
        _checks.rank(name, o, 4, "[B, T, HQ, Dv]")
        _checks.floating(name, o)
    if not (o_c.shape == o_s.shape == o_w.shape):
        raise ValueError(f"branch outputs must share one shape: o_c {o_c.shape}, o_s {o_s.shape}, "
                         f"o_w {o_w.shape}")
    _checks.gates(g, *o_c.shape[:3])
    f32 = jnp.float32
    if g is None:
        out = (o_c.astype(f32) + o_s.astype(f32) + o_w.astype(f32)) / 3.0
    else:
        g = g.astype(f32)
        out = g[..., 0:1] * o_c.astype(f32) + g[..., 1:2] * o_s.astype(f32) + g[..., 2:3] * o_w.astype(f32)
    return out.astype(o_c.dtype)


def nsa_attention(q, k, v, g=None, *, config: NSAConfig, segment_ids=None, compress_params=None,
                  implementation=None, interpret: bool = False, tilings=None,
                  max_segments: int | None = None):
    """Native Sparse Attention: compressed, selected and sliding-window branches, gated.

    Args:
      q: [B, T, HQ, D] queries; k: [B, S, H, D] keys; v: [B, S, H, Dv] values (S >= T if causal;
        query t sits at key position t + S - T).
      g: [B, T, HQ, 3] gates (compressed, selected, window) or None for 1/3 each.
      config: `NSAConfig`.
      segment_ids: int [B, T] packed documents (runs of one id; 0 = padding, zero output and
        zero gradients; needs S == T), e.g. from `segment_ids_from_cu_seqlens`. Each document
        gives exactly what it gives alone. "xla" and "triton" run the documents in an aligned
        layout (`segments.pack`), each document rounded up to lcm(d, l', select_q_tile) tokens.
      compress_params: parameters of phi for ``config.compress_method`` "linear"/"mlp".
      implementation: None ("triton" on a GPU, "xla" elsewhere), "xla", "reference", "triton"
        (Pallas kernels, forward and backward) or "mosaic" (not yet available).
      interpret: run Pallas kernels in interpret mode.
      tilings: `TritonTilings` for the "triton" kernels; None: the GPU generation's default.

      max_segments: static room of that layout, in documents per row; the default, ceil(T /
        lcm(...)), holds any packing whose documents average at least lcm(...) tokens. A row
        needing more room raises at run time.

    Returns:
      [B, T, HQ, Dv] in q.dtype. Differentiable in q, k, v, g and compress_params.
    """
    _checks.config(config)
    impl = _checks.implementation(implementation)
    _checks.tilings(tilings)
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal)
    _checks.gates(g, B, T, HQ)
    segments.check(segment_ids, B, T)
    if impl == "reference":
        return reference.nsa_attention(q, k, v, g, config=config, segment_ids=segment_ids,
                                       compress_params=compress_params)
    if segment_ids is not None:
        return _packed_nsa_attention(q, k, v, g, segment_ids, config, compress_params, impl,
                                     max_segments, interpret, tilings, auto=implementation is None)
    k_c, v_c = compress(k, v, config=config, params=compress_params)
    kw = dict(config=config, implementation=impl, interpret=interpret, tilings=tilings)
    o_c, lse_c = compressed_attention(q, k_c, v_c, kv_len=S, **kw)
    sel = select_blocks(q, k_c, lse=lse_c, kv_len=S, **kw)
    o_s = selected_attention(q, k, v, sel, **kw)
    o_w = sliding_window_attention(q, k, v, **kw)
    return gate_and_combine(o_c, o_s, o_w, g)


def _packed_nsa_attention(q, k, v, g, segment_ids, config: NSAConfig, params, impl: str,
                          max_segments, interpret: bool, tilings, auto: bool):
    """NSA over packed documents: each document moves to a row of the aligned layout that starts
    at a multiple of lcm(d, l', select_q_tile), so its compressed tokens, selection blocks and
    query tiles are those of the layout; per-row bounds keep every branch inside its document."""
    packing = _packing(segment_ids, config, max_segments, *q.shape[:2], k.shape[1])
    q_a, k_a, v_a = (segments.to_aligned(x, packing) for x in (q, k, v))
    T_a = q_a.shape[1]
    bounds = (packing.lo, packing.hi)
    c_bounds = segments.compressed_bounds(*bounds, config)
    k_c, v_c = compress(k_a, v_a, config=config, params=params)
    mod, kw = _backend(impl, interpret, tilings)
    o_c, lse_c = mod.compressed_attention(q_a, k_c, v_c, config, T_a, None, bounds=c_bounds, **kw)
    sel = mod.select_blocks(q_a, k_c, config, T_a, None, lse_c, bounds=bounds, **kw)
    mod_s, kw_s = mod, kw
    if auto and impl == "triton" and not pallas_triton.supports_block(config.select_block):
        mod_s, kw_s = xla, {}  # the one case the Triton kernels do not cover yet; same semantics
    # Causal rows never see past their document's end; non-causal ones must be told.
    o_s = mod_s.selected_attention(q_a, k_a, v_a, sel, config,
                                   bounds=None if config.causal else bounds, **kw_s)
    o_w = (mod.sliding_window_attention(q_a, k_a, v_a, config, bounds=bounds, **kw) if config.window
           else jnp.zeros_like(o_s))
    g_a = None if g is None else segments.to_aligned(g, packing)
    return segments.from_aligned(gate_and_combine(o_c, o_s, o_w, g_a), packing)
