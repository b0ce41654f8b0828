"""Public NSA functions.

Each validates its inputs once (`nsa_jax._checks`), asks the registry for a backend per operation
(`nsa_jax.ops.resolve`), runs packed documents through `segments.in_documents` and calls the
backends. ``implementation="reference"`` hands the whole call to `nsa_jax.reference`, which
validates with the same checks. Composition (`nsa_attention`) calls backends, never the public
functions again.
"""

from __future__ import annotations

import jax.numpy as jnp

from nsa_jax import _checks, metadata, ops, parallel, reference, segments
from nsa_jax.compression import check_params, compress_checked
from nsa_jax.config import NSAConfig
from nsa_jax.metadata import BlockSparseIndices
from nsa_jax.parallel import MeshAxes


class _Plan:
    """The backend of each operation of one call, with the call's interpret flag and tilings."""

    def __init__(self, implementation, ops_needed, config, shapes: ops.Shapes, interpret: bool,
                 tilings):
        self.backends = ops.resolve(implementation, ops_needed, config, shapes, interpret)
        self.interpret, self.tilings = interpret, tilings

    def __call__(self, op: str):
        """The backend method of ``op``, with interpret and the backend's tilings bound."""
        backend = self.backends[op]
        tilings = backend.tilings_from(self.tilings)
        method = {"compressed": backend.compressed_attention, "scoring": backend.select_blocks,
                  "selected": backend.selected_attention,
                  "window": backend.sliding_window_attention}[op]
        return lambda *args, **kw: method(*args, **kw, interpret=self.interpret, tilings=tilings)

    def compressed_and_selection(self, q, k_c, v_c, config, *, S, kv_len):
        """The fused pass of `ops.Backend.compressed_and_selection` when one backend runs both
        operations and has one for the call, else None."""
        backend = self.backends["compressed"]
        if backend is not self.backends["scoring"]:
            return None
        return backend.compressed_and_selection(q, k_c, v_c, config, S=S, kv_len=kv_len,
                                                interpret=self.interpret,
                                                tilings=backend.tilings_from(self.tilings))


def _packing(segment_ids, config: NSAConfig, max_segments):
    return None if segment_ids is None else segments.pack(segment_ids, config, max_segments)


def _key_length(config: NSAConfig, T: int, S: int, segment_ids, max_segments) -> int:
    """The key length backends see: S, or the aligned layout's length for packed rows."""
    return S if segment_ids is None else segments.capacity(T, config, max_segments)


def _compressed_call(q, k_c, v_c, lse, config: NSAConfig, kv_len, segment_ids, max_segments):
    """Validates the inputs of `compressed_attention` / `select_blocks`; returns their shapes (S:
    the key length, the aligned layout's when packed) and the per-row kv_len array or None."""
    B, T, HQ, H, D, Dv = _checks.compressed_inputs(q, k_c, v_c)
    _checks.lse(lse, B, T, HQ)
    _checks.packed(segment_ids, max_segments, B, T, T, kv_len)
    T_k = _key_length(config, T, T, segment_ids, max_segments)
    S, kv_arr = _checks.kv_len(T_k if segment_ids is not None else kv_len, B, T_k, k_c.shape[1],
                               config, causal=config.causal)
    return ops.Shapes(B, T, S, HQ, H, D, Dv, per_row_kv_len=kv_arr is not None,
                      select_block=config.select_block), kv_arr


def _empty(B: int, T: int, HQ: int, Dv: int, dtype):
    return jnp.zeros((B, T, HQ, Dv), dtype)


def _no_selection(B: int, H: int, rows: int, config: NSAConfig) -> BlockSparseIndices:
    """The selection of ``rows`` queries that have nothing to select from."""
    n_tiles = -(-rows // config.select_q_tile)
    return BlockSparseIndices(jnp.full((B, H, n_tiles, config.num_selected), -1, jnp.int32),
                              jnp.zeros((B, H, n_tiles), jnp.int32),
                              q_tile=config.select_q_tile, block_size=config.select_block)


def compressed_attention(q, k_c, v_c, *, config: NSAConfig, kv_len=None, implementation=None,
                         interpret: bool = False, tilings=None, segment_ids=None,
                         max_segments: int | None = None):
    """Attention of every query over the compressed tokens it may see.

    Args:
      q: [B, T, HQ, D] queries. k_c, v_c: [B, N_c, H, D] and [B, N_c, H, Dv] from `compress`.
      config: `NSAConfig`.
      kv_len: key length S the compressed tokens came from (int or int32[B]); default T. Query t
        sits at key position t + (S - T).
      implementation: None (per operation, the fastest backend that runs here and supports the
        call: "mosaic" on Hopper, "triton" on other GPUs, "xla" elsewhere), "xla", "triton",
        "mosaic" (Mosaic GPU kernels for the forward, scoring and most of the backward where
        they serve the call, Triton kernels for the rest) or "reference". An explicit backend
        that cannot serve the call raises, saying why.
      interpret: run Pallas kernels in interpret mode (with an explicit Pallas implementation).
      tilings: a backend's tilings (`MosaicTilings`, `TritonTilings`, `XlaTilings`; speed
        only); None, or another backend's, means that backend's default for the device. Every
        function below takes the same ``implementation``, ``interpret`` and ``tilings``.
      segment_ids, max_segments: packed documents, as in `nsa_attention` (then kv_len must be
        None, and k_c, v_c come from `compress` with the same segment ids). Every function below
        takes them; each document gives what it gives alone.

    Returns:
      o [B, T, HQ, Dv] in q.dtype (zero where no compressed token is visible) and
      lse [B, T, HQ] float32 (-inf there).
    """
    _checks.options(config, implementation, interpret, tilings)
    if implementation == "reference":
        return reference.compressed_attention(q, k_c, v_c, config=config, kv_len=kv_len,
                                              segment_ids=segment_ids, max_segments=max_segments)
    shapes, kv_arr = _compressed_call(q, k_c, v_c, None, config, kv_len, segment_ids,
                                      max_segments)
    B, T, S, HQ, Dv = shapes.B, shapes.T, shapes.S, shapes.HQ, shapes.Dv
    run = _Plan(implementation, ("compressed",), config, shapes, interpret, tilings)
    if B == 0 or T == 0:
        return _empty(B, T, HQ, Dv, q.dtype), jnp.full((B, T, HQ), -jnp.inf, jnp.float32)

    def body(q, key_bounds):
        return run("compressed")(q, k_c, v_c, config, S=S, kv_len=kv_arr,
                                 compressed_bounds=key_bounds and key_bounds.compressed(config))

    return segments.in_documents(_packing(segment_ids, config, max_segments), body, q,
                                 fill=(0, -jnp.inf))


def select_blocks(q, k_c, *, config: NSAConfig, lse=None, kv_len=None, implementation=None,
                  interpret: bool = False, tilings=None, segment_ids=None,
                  max_segments: int | None = None) -> BlockSparseIndices:
    """Top-n selection blocks per (batch, KV head, query tile), shared by the G heads of a group.

    Args:
      q: [B, T, HQ, D]. k_c: [B, N_c, H, D].
      lse: optional float [B, T, HQ] log-sum-exp from `compressed_attention`, saving its
        recomputation.
      kv_len: as in `compressed_attention`.

    Returns:
      `BlockSparseIndices` with indices int32[B, H, ceil(T / select_q_tile), num_selected]. Not
      differentiable (selection is discrete; gradients flow through the compressed branch).
      With ``segment_ids`` the tiles and block ids are those of the aligned layout (T_a rows, see
      `compress`), ready for `selected_attention` with the same segment ids.
    """
    _checks.options(config, implementation, interpret, tilings)
    if implementation == "reference":
        return reference.select_blocks(q, k_c, config=config, lse=lse, kv_len=kv_len,
                                       segment_ids=segment_ids, max_segments=max_segments)
    shapes, kv_arr = _compressed_call(q, k_c, None, lse, config, kv_len, segment_ids,
                                      max_segments)
    B, T, S, H = shapes.B, shapes.T, shapes.S, shapes.H
    run = _Plan(implementation, ("scoring",), config, shapes, interpret, tilings)
    if B == 0 or T == 0:
        return _no_selection(B, H, T if segment_ids is None else S, config)

    def body(q, lse, key_bounds):
        return run("scoring")(q, k_c, config, S=S, kv_len=kv_arr, lse=lse, key_bounds=key_bounds)

    return segments.in_documents(_packing(segment_ids, config, max_segments), body, q, lse,
                                 fill=None)


def _selection(sel, config: NSAConfig, B: int, T: int, S: int, H: int, packed: bool
               ) -> BlockSparseIndices:
    """``sel`` checked against the rows it must cover (T queries over S keys, those of the aligned
    layout when packed) and normalised as docs/design.md §4 reads it."""
    _checks.selection(sel, B, T, H, packed)
    if isinstance(sel, BlockSparseIndices):
        return metadata.normalize(sel, -(-S // sel.block_size))
    return metadata.from_per_token(sel, config.select_block, -(-S // config.select_block))


def selected_attention(q, k, v, sel, *, config: NSAConfig, kv_len=None, implementation=None,
                       interpret: bool = False, tilings=None, segment_ids=None,
                       max_segments: int | None = None):
    """Attention of each query over the keys of its tile's selected blocks (causal within them).

    Args:
      q: [B, T, HQ, D], k: [B, S, H, D], v: [B, S, H, Dv].
      sel: `BlockSparseIndices` (e.g. from `select_blocks`; user-built ones are read as
        docs/design.md §4 says) or per-token int32[B, T, H, n] block ids of size
        ``config.select_block`` (entries outside [0, number of blocks) ignored). Used exactly as
        given: nothing is forced or added.
      kv_len: keys each row holds (int or int32[B], e.g. a cache's lengths); default S. Keys at
        or past it are never seen, and query t sits at key position t + (kv_len - T).

    Returns:
      [B, T, HQ, Dv] in q.dtype; a query with no visible selected key gets zeros.
    """
    _checks.options(config, implementation, interpret, tilings)
    if implementation == "reference":
        return reference.selected_attention(q, k, v, sel, config=config, kv_len=kv_len,
                                            segment_ids=segment_ids, max_segments=max_segments)
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal)
    _checks.packed(segment_ids, max_segments, B, T, S, kv_len)
    kv_arr = _checks.key_lengths(kv_len, B, T, S, causal=config.causal)
    T_k = _key_length(config, T, S, segment_ids, max_segments)
    rows = T_k if segment_ids is not None else T
    sel = _selection(sel, config, B, rows, T_k, H, segment_ids is not None)
    run = _Plan(implementation, ("selected",), config,
                ops.Shapes(B, T, T_k, HQ, H, D, Dv, per_row_kv_len=kv_arr is not None,
                           select_block=sel.block_size), interpret, tilings)
    if B == 0 or T == 0:
        return _empty(B, T, HQ, Dv, q.dtype)

    def body(q, k, v, key_bounds):
        return run("selected")(q, k, v, sel, config, kv_len=kv_arr,
                               key_bounds=_selected_bounds(config, key_bounds))

    return segments.in_documents(_packing(segment_ids, config, max_segments), body, q, k, v)


def gated_branches(run: _Plan, q, k, v, k_c, v_c, g, config: NSAConfig, *, S: int, kv_len,
                   key_bounds):
    """The composition of `nsa_attention` on validated inputs: compressed branch, scoring,
    selected and window branches through ``run``'s backends, gated; returns (o, selection).
    ``kv_len``: None or int32[B] (a decode cache); ``key_bounds``: packed rows' bounds or None."""
    fused = None if key_bounds else run.compressed_and_selection(q, k_c, v_c, config, S=S,
                                                                  kv_len=kv_len)
    if fused is None:
        c_bounds = key_bounds and key_bounds.compressed(config)
        o_c, lse = run("compressed")(q, k_c, v_c, config, S=S, kv_len=kv_len,
                                     compressed_bounds=c_bounds)
        sel = run("scoring")(q, k_c, config, S=S, kv_len=kv_len, lse=lse, key_bounds=key_bounds)
    else:
        o_c, _, sel = fused
    o_s = run("selected")(q, k, v, sel, config, kv_len=kv_len,
                          key_bounds=_selected_bounds(config, key_bounds))
    o_w = (run("window")(q, k, v, config, kv_len=kv_len, key_bounds=key_bounds)
           if config.window else jnp.zeros_like(o_s))
    return _combine(o_c, o_s, o_w, g), sel


def attend_with_lengths(q, k, v, k_c, v_c, g, kv_len, *, config: NSAConfig, implementation=None,
                        interpret: bool = False, tilings=None, key_bounds=None):
    """(o, selection) of the gated branches for q [B, T, HQ, D] at key positions kv_len - T + t
    over keys k [B, S, H, D] (and their compressed tokens k_c, v_c) of which row b holds
    ``kv_len[b]`` (int32[B]); inputs already validated. A decode step over a cache and a device's
    slice of the queries under context parallelism both attend this way. ``key_bounds``: the
    documents of packed rows, as `segments.KeyBounds` of the queries (keys in an aligned layout;
    not with the reference)."""
    B, T, HQ, D = q.shape
    S, H, Dv = k.shape[1], k.shape[2], v.shape[3]
    kv_len = kv_len.astype(jnp.int32)
    if implementation == "reference":
        o_c, lse = reference.compressed_attention(q, k_c, v_c, config=config, kv_len=kv_len)
        sel = reference.select_blocks(q, k_c, config=config, lse=lse, kv_len=kv_len)
        o_s = reference.selected_attention(q, k, v, sel, config=config, kv_len=kv_len)
        o_w = reference.sliding_window_attention(q, k, v, config=config, kv_len=kv_len)
        return reference.gate_and_combine(o_c, o_s, o_w, g), sel
    config = _checks.effective(config, S, T)
    needed = ("compressed", "scoring", "selected") + (("window",) if config.window else ())
    run = _Plan(implementation, needed, config,
                ops.Shapes(B, T, S, HQ, H, D, Dv, per_row_kv_len=True,
                           select_block=config.select_block), interpret, tilings)
    return gated_branches(run, q, k, v, k_c, v_c, g, config, S=S, kv_len=kv_len,
                          key_bounds=key_bounds)


def _selected_bounds(config: NSAConfig, key_bounds):
    """Causal rows never see past their document's end (its blocks are its own); non-causal
    rows must be told."""
    return None if config.causal else key_bounds


def sliding_window_attention(q, k, v, *, config: NSAConfig, kv_len=None, implementation=None,
                             interpret: bool = False, tilings=None, segment_ids=None,
                             max_segments: int | None = None):
    """Sliding-window branch: causal keys p - w < s <= p for the query at key position p;
    non-causal |s - p| < w.

    ``kv_len``: as in `selected_attention`. Returns [B, T, HQ, Dv] in q.dtype; zeros when
    ``config.window == 0``.
    """
    _checks.options(config, implementation, interpret, tilings)
    if implementation == "reference":
        return reference.sliding_window_attention(q, k, v, config=config, kv_len=kv_len,
                                                  segment_ids=segment_ids,
                                                  max_segments=max_segments)
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal)
    _checks.packed(segment_ids, max_segments, B, T, S, kv_len)
    kv_arr = _checks.key_lengths(kv_len, B, T, S, causal=config.causal)
    config = _checks.effective(config, S, T)
    T_k = _key_length(config, T, S, segment_ids, max_segments)
    run = _Plan(implementation, ("window",), config,
                ops.Shapes(B, T, T_k, HQ, H, D, Dv, per_row_kv_len=kv_arr is not None,
                           select_block=config.select_block), interpret, tilings)
    if B == 0 or T == 0 or S == 0 or config.window == 0:
        return _empty(B, T, HQ, Dv, q.dtype)

    def body(q, k, v, key_bounds):
        return run("window")(q, k, v, config, kv_len=kv_arr, key_bounds=key_bounds)

    return segments.in_documents(_packing(segment_ids, config, max_segments), body, q, k, v)


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
    return _combine(o_c, o_s, o_w, g)


def _combine(o_c, o_s, o_w, g):
    f32 = jnp.float32
    if g is None:
        out = (o_c.astype(f32) + o_s.astype(f32) + o_w.astype(f32)) / 3.0
    else:
        g = g.astype(f32)
        out = g[..., 0:1] * o_c.astype(f32) + g[..., 1:2] * o_s.astype(f32) + g[..., 2:3] * o_w.astype(f32)
    return out.astype(o_c.dtype)


def nsa_attention(q, k, v, g=None, *, config: NSAConfig, segment_ids=None, compress_params=None,
                  implementation=None, interpret: bool = False, tilings=None,
                  max_segments: int | None = None, return_selection: bool = False,
                  mesh_axes: MeshAxes | None = None):
    """Native Sparse Attention: compressed, selected and sliding-window branches, gated.

    Args:
      q: [B, T, HQ, D] queries; k: [B, S, H, D] keys; v: [B, S, H, Dv] values (S >= T if causal;
        query t sits at key position t + S - T).
      g: [B, T, HQ, 3] gates (compressed, selected, window) or None for 1/3 each.
      config: `NSAConfig`.
      segment_ids: int [B, T] packed documents (runs of one id; 0 = padding, zero output and
        zero gradients; needs S == T), e.g. from `segment_ids_from_cu_seqlens`. Each document
        gives exactly what it gives alone. Documents run in an aligned layout (`segments.pack`),
        each rounded up to lcm(d, l', select_q_tile) tokens.
      compress_params: parameters of phi for ``config.compress_method`` "linear"/"mlp".
      implementation: None (per operation, the fastest backend that runs here and supports the
        call), "xla", "triton" (Pallas kernels, forward and backward), "mosaic" (Hopper:
        Mosaic GPU kernels for the forward, scoring and most of the backward where they serve
        the call, Triton kernels for the rest) or "reference". An explicit backend that cannot
        serve the call raises, saying why.
      interpret: run Pallas kernels in interpret mode.
      tilings: a backend's tilings (`MosaicTilings`, `TritonTilings`, `XlaTilings`); None: the
        device's default.
      max_segments: static room of that layout, in documents per row; the default, ceil(T /
        lcm(...)), holds any packing whose documents average at least lcm(...) tokens. A row
        needing more room raises at run time.
      return_selection: also return the blocks the selected branch attended to (not with
        ``segment_ids``: packed rows select in the aligned layout).
      mesh_axes: `MeshAxes`: the mesh axes of the current mesh (`jax.set_mesh`) that shard B
        (data parallel), HQ and H (head parallel) and T (context parallel). Default: read from
        q's type under explicit mesh axes (with the layout of a ``MeshAxes`` that names no
        axis, e.g. ``MeshAxes(layout="zigzag")``), none otherwise. The computation then runs in one
        `jax.shard_map` (`nsa_jax.parallel`) and gives the single-device result; a layout it
        cannot serve raises naming the axis.

    Returns:
      [B, T, HQ, Dv] in q.dtype, differentiable in q, k, v, g and compress_params; with
      ``return_selection``, a pair of it and the `BlockSparseIndices` (not differentiated).
    """
    _checks.options(config, implementation, interpret, tilings)
    if not isinstance(return_selection, bool):
        raise TypeError(f"return_selection must be a bool, got {return_selection!r}")
    if return_selection and segment_ids is not None:
        raise ValueError("return_selection is not supported with segment_ids: packed rows "
                         "select blocks in the aligned layout, not per token of the input")
    options = dict(config=config, implementation=implementation, interpret=interpret,
                   tilings=tilings)
    if mesh_axes is not None and not isinstance(mesh_axes, MeshAxes):
        raise TypeError(f"mesh_axes must be an nsa_jax.MeshAxes or None, got {mesh_axes!r}")
    axes = mesh_axes
    if mesh_axes is None or not mesh_axes.any():
        axes = parallel.from_types(q, layout=mesh_axes.layout if mesh_axes else "contiguous")
    if axes is not None and axes.any():
        B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal)
        _checks.gates(g, B, T, HQ)
        check_params(config, compress_params, H, D, Dv)
        _checks.packed(segment_ids, max_segments, B, T, S)
        config = options["config"] = _checks.effective(config, S, T)
        mesh = parallel.check(axes, config, B, T, S, H, segment_ids is not None)
        if not (B and T and S):
            return _nsa_attention(q, k, v, g, segment_ids=segment_ids,
                                  compress_params=compress_params, max_segments=max_segments,
                                  return_selection=return_selection, **options)

        def local(q, k, v, g, seg, params):
            return _nsa_attention(q, k, v, g, segment_ids=seg, compress_params=params,
                                  max_segments=max_segments, return_selection=return_selection,
                                  **options)

        def attend(q, k, v, k_c, v_c, g, kv_len, key_bounds=None):
            return attend_with_lengths(q, k, v, k_c, v_c, g, kv_len, key_bounds=key_bounds,
                                       **options)

        return parallel.run(local, attend, axes, mesh, q, k, v, g, segment_ids, compress_params,
                            config=config, return_selection=return_selection,
                            max_segments=max_segments,
                            gather_all=implementation == "reference")
    return _nsa_attention(q, k, v, g, segment_ids=segment_ids, compress_params=compress_params,
                          max_segments=max_segments, return_selection=return_selection, **options)


def _nsa_attention(q, k, v, g, *, config: NSAConfig, segment_ids, compress_params, implementation,
                   interpret: bool, tilings, max_segments, return_selection: bool):
    """`nsa_attention` on one device's arrays (options checked)."""
    if implementation == "reference":
        o = reference.nsa_attention(q, k, v, g, config=config, segment_ids=segment_ids,
                                    compress_params=compress_params, max_segments=max_segments)
        if not return_selection:
            return o
        k_c, _ = compress_checked(k, v, config, compress_params)
        return o, reference.select_blocks(q, k_c, config=config, kv_len=k.shape[1])
    B, T, S, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=config.causal)
    _checks.gates(g, B, T, HQ)
    check_params(config, compress_params, H, D, Dv)
    _checks.packed(segment_ids, max_segments, B, T, S)
    config = _checks.effective(config, S, T)
    T_k = _key_length(config, T, S, segment_ids, max_segments)
    needed = ("compressed", "scoring", "selected") + (("window",) if config.window else ())
    run = _Plan(implementation, needed, config,
                ops.Shapes(B, T, T_k, HQ, H, D, Dv, select_block=config.select_block), interpret,
                tilings)
    if B == 0 or T == 0 or S == 0:
        o = _empty(B, T, HQ, Dv, q.dtype)
        return (o, _no_selection(B, H, T, config)) if return_selection else o

    def body(q, k, v, g, key_bounds):
        k_c, v_c = compress_checked(k, v, config, compress_params)
        o, sel = gated_branches(run, q, k, v, k_c, v_c, g, config, S=T_k, kv_len=None,
                                key_bounds=key_bounds)
        return (o, sel) if return_selection else o

    return segments.in_documents(_packing(segment_ids, config, max_segments), body, q, k, v, g)
