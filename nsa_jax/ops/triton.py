"""The "triton" backend: the three branches on the Pallas flash core (Triton lowering).

Forward and backward run kernels. Each branch is a `jax.custom_vjp` whose residuals are O(T): the
inputs, the branch output, its log-sum-exp and the compact selection metadata. The backward
recomputes probabilities tile by tile (`kernels/triton/flash_bwd.py`): dQ walks the forward's KV
blocks, dK/dV walk the query tiles that see each KV block (the reverse map for the selected
branch), with no atomics. Block scoring runs the compressed-mass kernel, then the shared
selection rules (`nsa_jax.ops.selection`); selection is not differentiated.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nsa_jax import metadata
from nsa_jax.config import NSAConfig
from nsa_jax.kernels.common import FAR, BlockTable, Launch, MaskRule, ReverseTable, pow2
from nsa_jax.kernels.mosaic_gpu.block_scores import compressed_mass as mosaic_compressed_mass
from nsa_jax.kernels.mosaic_gpu.block_scores import cta_queries
from nsa_jax.kernels.mosaic_gpu.flash_bwd import flash_backward_dkv as mosaic_flash_backward_dkv
from nsa_jax.kernels.mosaic_gpu.flash_bwd import flash_backward_dq as mosaic_flash_backward_dq
from nsa_jax.kernels.mosaic_gpu.flash_fwd import MosaicFlashConfig
from nsa_jax.kernels.mosaic_gpu.flash_fwd import flash_forward as mosaic_flash_forward
from nsa_jax.kernels.triton.block_scores import compressed_mass, scored_block_mass
from nsa_jax.kernels.triton.flash_bwd import flash_backward
from nsa_jax.kernels.triton.flash_fwd import SUMS_UNIT, BlockSums, FlashConfig, flash_forward
from nsa_jax.kernels.triton.selected_by_block import selected_by_block, selected_by_block_backward
from nsa_jax.kernels.triton.tiling import TritonTilings, default_tilings
from nsa_jax.kernels.triton.top_blocks import BlockRule, per_token_top_blocks, tile_top_blocks
from nsa_jax.ops import base, selection

# Per-token selected attention runs block-major (`kernels/triton/selected_by_block.py`) for
# groups of at most these many heads (padded to a power of two), query-major above; forward and
# backward choose apart. H200, T=65536, bf16, forward: G=2 11.8 ms block-major against 42.3
# query-major, G=4 19.4 / 42.4, G=8 17.4 / 19.8, G=16 33.4 / 20.3 (there the float32 partials
# cost more traffic than re-loading blocks for 16 rows saves). Forward+backward: G=4 41.4 ms
# both block-major against 144.2 both query-major; G=16, query-major forward, 61.3 with the
# block-major backward against 70.9. G > 16 is unmeasured.
BY_BLOCK_MAX_GROUP = 8
BY_BLOCK_MAX_GROUP_BWD = 16
# Block-major pays by sharing a loaded block among the queries that chose it; a call with fewer
# queries (a decode step) shares none and would pay the reverse map and partials for nothing.
BY_BLOCK_MIN_QUERIES = 256

# A call of at most this many queries (a decode step) has the compressed branch hand its block
# sums to the selection, while they take at most SCORED_BYTES (float32, about a quarter of the
# [B, H, T_p * G_p, N_p] scores: 9.6 MiB for one token at B=32, H=4, G=16 and 64k keys); other
# calls score in a pass of their own.
SCORED_MAX_QUERIES = 16
SCORED_BYTES = 1 << 28
# Such a call has one program per (row, KV head) and query tile, too few to keep the memory busy:
# each branch's forward walks shares of a tile's KV blocks (at least MIN_SHARE blocks each) so
# that about SHARE_PROGRAMS programs run. H200, B=32, one-token steps in a loop at 64k/128k
# (HQ=64, H=4). Compressed: 256 programs 230/341 us a step, 512 243/377, unshared 252/433; at
# B=1 shares take 64k from 153 to 100 us. Selected and window: unshared 214/329, 256 programs
# (two shares) 201/292 and 182/272 in a second run, 512 229/304 and 177/278, 1024 in shares of
# one block 203/300 and 192/274; the selected kernel went from 32 to 22 us, the window from 18
# to 13.
SHARE_PROGRAMS = {"compressed": 256, "selected": 256, "window": 256}
MIN_SHARE = {"compressed": 4, "selected": 2, "window": 2}

# Tiled selection chooses with `tile_top_blocks` (one program holds a tile's N_s scores) up to
# this many selection blocks (512k keys at l'=64), and with XLA's `choose_blocks` beyond.
# H200, 64k (HQ=64/H=4, HQ=32/H=8): 0.18 and 0.44 ms against XLA's 0.39 and 0.64, same ids.
TOP_MAX_BLOCKS = 8192

# Upper bound on the float32 compressed-mass partials scoring materialises at once (one row of
# N_c sums per query sub-tile of a mass kernel's program or CTA); longer inputs are scored in
# chunks of query tiles. At HQ=64, H=4 the Triton kernel's partials take 2 GiB at 128k, the
# Mosaic kernel's 1 GiB: both run in one chunk, as measured.
MASS_BYTES = 1 << 31


def key_offsets(B: int, T: int, S: int, kv_len=None):
    """int32[B]: the key position of query 0 of each row."""
    if kv_len is None:
        return jnp.full((B,), S - T, jnp.int32)
    return (kv_len - T).astype(jnp.int32)


def _zero_cotangent(x):
    return np.zeros(x.shape, jax.dtypes.float0)


def _per_batch_shard(fn, *args):
    """``fn(*args)``, on each batch shard (`jax.shard_map`) when the batch axis of the first
    argument is sharded over explicit mesh axes: pallas_call takes no explicitly sharded operand.
    Every array argument and result has the batch axis first."""
    batch = jax.typeof(jax.tree.leaves(args[0])[0]).sharding.spec[0]
    if batch is None:
        return fn(*args)
    args = jax.tree.map(lambda x: jax.sharding.reshard(x, P(batch)), args)
    # check_vma=False: the kernels' out_shape carries no varying-axes annotation.
    return jax.shard_map(fn, in_specs=P(batch), out_specs=P(batch), check_vma=False)(*args)


def flash(q, k, v, offsets, sel, bounds, *static, by_block=(False, False)):
    """(o, lse) of the flash core, differentiable (`_flash_vjp`), per batch shard. The forward
    runs the Mosaic GPU kernel when its tiling ``static[2]`` is a `MosaicFlashConfig` (the
    "mosaic" backend), the Triton kernels otherwise; the backward runs the kernels its tiling
    ``static[3]`` names (`_backward`), which read only the residuals (inputs, o, lse), whichever
    kernel made them."""
    return _per_batch_shard(lambda *a: _flash_vjp(*a, *static, by_block), q, k, v, offsets, sel,
                            bounds)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11, 12))
def _flash_vjp(q, k, v, offsets, sel, bounds, rule: MaskRule, scale: float, fwd: FlashConfig,
               bwd: FlashConfig, q_tile: int, interpret: bool, by_block: tuple[bool, bool]):
    """(o, lse) of the flash core over a block range (``sel`` None) or the KV blocks of
    ``sel = (indices, counts)`` (selection tiles of ``q_tile`` queries, blocks of ``fwd.block_k``),
    within the per-query key ``bounds`` = (lo, hi) of packed rows if given. ``by_block``
    (forward, backward; ``q_tile`` 1 only): run the block-major kernels of `selected_by_block`
    for that pass. Either pass reads the other's results, so they may differ."""
    return _flash_fwd(q, k, v, offsets, sel, bounds, rule, scale, fwd, bwd, q_tile, interpret,
                      by_block)[0]


def _flash_fwd(q, k, v, offsets, sel, bounds, rule, scale, fwd, bwd, q_tile, interpret, by_block):
    o, lse = _forward_kernel(q, k, v, offsets, sel, bounds, rule, scale, fwd, q_tile, interpret,
                             by_block[0])
    return (o, lse), (q, k, v, offsets, sel, bounds, o, lse)


def _flash_bwd(rule, scale, fwd, bwd, q_tile, interpret, by_block, res, ct):
    q, k, v, offsets, sel, bounds, o, lse = res
    do, dlse = ct
    dq, dk, dv = _backward_kernels(q, k, v, o, lse, do, dlse, offsets, sel, bounds, rule, scale,
                                   fwd.block_k, bwd, q_tile, interpret, by_block[1])
    zeros = [None if x is None else tuple(_zero_cotangent(a) for a in x) for x in (sel, bounds)]
    return dq, dk, dv, _zero_cotangent(offsets), *zeros


_flash_vjp.defvjp(_flash_fwd, _flash_bwd)


def _forward(q, k, v, offsets, sel, bounds, rule, scale, fwd: FlashConfig, q_tile, interpret,
             by_block):
    if by_block:
        return selected_by_block(q, k, v, offsets, *sel, rule=rule, scale=scale, config=fwd,
                                 bounds=bounds, interpret=interpret)
    blocks = None if sel is None else BlockTable(*sel, q_tile=q_tile)
    if isinstance(fwd, MosaicFlashConfig):
        if bounds is not None:
            raise NotImplementedError("the Mosaic GPU forward kernel takes no packed rows")
        return mosaic_flash_forward(q, k, v, offsets, rule=rule, scale=scale, config=fwd,
                                    blocks=blocks, interpret=interpret)
    return flash_forward(q, k, v, offsets, rule=rule, scale=scale, config=fwd, blocks=blocks,
                         bounds=bounds, interpret=interpret)


def _backward(q, k, v, o, lse, do, dlse, offsets, sel, bounds, rule, scale, block_k,
              bwd: FlashConfig | tuple, q_tile, interpret, by_block):
    args = (q, k, v, o, lse, do, dlse, offsets)
    dq = dk = dv = None
    if isinstance(bwd, tuple):
        # (dQ config, dK/dV config, Triton tiling): the Mosaic GPU kernels where a config is
        # given, the Triton kernels for the rest.
        dq_config, dkv_config, bwd = bwd
        if dq_config is not None:
            table, _ = _tables(sel, q_tile, block_k, dq_config.block_k, k.shape[1])
            dq = mosaic_flash_backward_dq(*args, rule=rule, scale=scale, config=dq_config,
                                          blocks=table, interpret=interpret)
        if dkv_config is not None:
            table, rev = _tables(sel, q_tile, block_k, dkv_config.block_k, k.shape[1],
                                 reverse=True)
            dk, dv = mosaic_flash_backward_dkv(*args, rule=rule, scale=scale, config=dkv_config,
                                               blocks=table, reverse=rev, interpret=interpret)
        if dq is not None and dk is not None:
            return dq, dk, dv
    if by_block:
        if dq is not None or dk is not None:
            raise NotImplementedError("the block-major selected backward has no Mosaic GPU "
                                      "kernels; give it a Triton tiling")
        # The forward's block ids are the backward's: one kernel reads both.
        bwd = dataclasses.replace(bwd, block_k=block_k)
        return selected_by_block_backward(*args, *sel, rule=rule, scale=scale, config=bwd,
                                          bounds=bounds, interpret=interpret)
    blocks, reverse = _tables(sel, q_tile, block_k, bwd.block_k, k.shape[1], reverse=True)
    tq, tk, tv = flash_backward(*args, rule=rule, scale=scale, config=bwd, blocks=blocks,
                                reverse=reverse, bounds=bounds, interpret=interpret,
                                with_dq=dq is None, with_dkv=dk is None)
    return (tq if dq is None else dq), *((tk, tv) if dk is None else (dk, dv))


def _tables(sel, q_tile: int, block_k: int, new_block_k: int, S: int, reverse: bool = False):
    """The forward's table ``sel`` (blocks of ``block_k`` keys) as a kernel's `BlockTable` in
    blocks of ``new_block_k``, and (``reverse``) its `ReverseTable`; (None, None) without one."""
    if sel is None:
        return None, None
    n_kb = -(-S // new_block_k)
    table = metadata.reblock(metadata.BlockSparseIndices(*sel, q_tile=q_tile, block_size=block_k),
                             new_block_k, n_kb)
    rev = None
    if reverse:
        rev = metadata.reverse_map(table, n_kb)
        rev = ReverseTable(rev.tiles, rev.offsets)
    return BlockTable(table.indices, table.counts, q_tile=q_tile), rev


def _no_second_order(*args):
    raise NotImplementedError(
        "implementation='triton' and 'mosaic' have no second-order gradients (their kernels "
        "have no derivative of their own); use implementation='xla' or 'reference' for gradients "
        "of gradients")


# The kernels a gradient runs, each without a derivative: differentiating a gradient (second
# order) reaches these and raises the error above instead of failing inside Pallas.
_forward_kernel = jax.custom_vjp(_forward, nondiff_argnums=(6, 7, 8, 9, 10, 11))
_forward_kernel.defvjp(lambda *a: (_forward(*a), None), _no_second_order)
_backward_kernels = jax.custom_vjp(_backward, nondiff_argnums=(10, 11, 12, 13, 14, 15, 16))
_backward_kernels.defvjp(lambda *a: (_backward(*a), None), _no_second_order)


def _shared(fwd, branch: str, programs: int, blocks: int):
    """``fwd`` with shares (`FlashConfig.splits`, a power of two) for a call of ``programs``
    programs walking up to ``blocks`` KV blocks each: enough for about ``SHARE_PROGRAMS[branch]``
    programs, each share at least ``MIN_SHARE[branch]`` blocks. A Mosaic config is kept."""
    if not isinstance(fwd, FlashConfig):
        return fwd
    splits = max(1, min(SHARE_PROGRAMS[branch] // programs, blocks // MIN_SHARE[branch]))
    return dataclasses.replace(fwd, splits=pow2(splits + 1) // 2)


def compressed_rule(cfg: NSAConfig, N_c: int) -> MaskRule:
    return MaskRule(num_keys=N_c, key_stride=cfg.compress_stride,
                    key_offset=cfg.compress_block - 1, causal=cfg.causal)


def compressed_attention(q, k_c, v_c, cfg: NSAConfig, S: int, kv_len=None, bounds=None,
                         interpret=False, tilings: TritonTilings | None = None, fwd=None,
                         mosaic_bwd=None):
    """``bounds``: optional `segments.CompressedBounds` (packed rows). ``fwd``: the forward's
    config instead of ``tilings``' (a `MosaicFlashConfig` runs the Mosaic GPU kernel); the same
    for the other branches. ``mosaic_bwd``: (dQ, dK/dV) `MosaicFlashConfig`s, either None, run
    those gradients on the Mosaic GPU kernels (no ``bounds``); the same for the window branch."""
    B, T, HQ, D = q.shape
    G = HQ // k_c.shape[2]
    t = default_tilings() if tilings is None else tilings
    bwd = t.compressed_bwd.flash(G)
    return flash(q, k_c, v_c, key_offsets(B, T, S, kv_len), None, bounds_tuple(bounds),
                  compressed_rule(cfg, k_c.shape[1]), cfg.softmax_scale(D),
                  t.compressed.flash(G, queries=T) if fwd is None else fwd,
                  bwd if mosaic_bwd is None else (*mosaic_bwd, bwd), 1, interpret)


def selected_attention(q, k, v, sel: metadata.BlockSparseIndices, cfg: NSAConfig, bounds=None,
                       interpret=False, tilings: TritonTilings | None = None, fwd=None,
                       kv_len=None, mosaic_bwd=None):
    """``sel``: normalised indices (`metadata.normalize`); ``bounds``: `segments.KeyBounds`; a
    ``fwd`` given runs query-major (never the block-major forward). ``kv_len`` (int32[B], causal
    only): the causal rule hides each row's keys past it. ``mosaic_bwd``: (dQ, dK/dV) Mosaic GPU
    configs (or None) for a query-major backward (tiles of whole Mosaic CTAs), as in
    `_backward`."""
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    G = HQ // H
    t = default_tilings() if tilings is None else tilings
    many = sel.q_tile == 1 and T >= BY_BLOCK_MIN_QUERIES
    by_block = (fwd is None and many and pow2(G) <= BY_BLOCK_MAX_GROUP,
                many and pow2(G) <= BY_BLOCK_MAX_GROUP_BWD)
    if fwd is None:
        fwd = (t.selected_by_block if by_block[0] else
               t.selected_per_token if sel.q_tile == 1 else t.selected)
        fwd = fwd.flash(G, q_tile=None if by_block[0] else sel.q_tile,
                        block_k_divides=sel.block_size,
                        queries=T if T <= SCORED_MAX_QUERIES else None)
        if T <= SCORED_MAX_QUERIES:
            fwd = _shared(fwd, "selected", B * H * -(-T // fwd.block_q),
                          sel.indices.shape[-1] * sel.block_size // fwd.block_k)
    bwd = t.selected_by_block_bwd if by_block[1] else t.selected_bwd
    bwd = bwd.flash(G, q_tile=None if by_block[1] else sel.q_tile,
                    block_k_divides=sel.block_size)
    blocks = metadata.reblock(sel, fwd.block_k, -(-S // fwd.block_k))
    o, _ = flash(q, k, v, key_offsets(B, T, S, kv_len), (blocks.indices, blocks.counts),
                  bounds_tuple(bounds),
                  MaskRule(num_keys=S, causal=cfg.causal), cfg.softmax_scale(D), fwd,
                  bwd if mosaic_bwd is None or by_block[1] else (*mosaic_bwd, bwd),
                  sel.q_tile, interpret, by_block=by_block)
    return o


def sliding_window_attention(q, k, v, cfg: NSAConfig, bounds=None, interpret=False,
                             tilings: TritonTilings | None = None, fwd=None, kv_len=None,
                             mosaic_bwd=None):
    """``bounds``: optional `segments.KeyBounds` (packed rows); ``kv_len`` as in
    `selected_attention`."""
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    t = default_tilings() if tilings is None else tilings
    bwd = t.window_bwd.flash(HQ // H)
    if fwd is None:
        fwd = t.window.flash(HQ // H, queries=T)
        if T <= SCORED_MAX_QUERIES and cfg.window:
            fwd = _shared(fwd, "window", B * H * -(-T // fwd.block_q),
                          -(-(cfg.window + T) // fwd.block_k))
    o, _ = flash(q, k, v, key_offsets(B, T, S, kv_len), None, bounds_tuple(bounds),
                  MaskRule(num_keys=S, causal=cfg.causal, window=cfg.window), cfg.softmax_scale(D),
                  fwd, bwd if mosaic_bwd is None else (*mosaic_bwd, bwd), 1, interpret)
    return o


def _top_on_chip(scores, first, last, kv_blocks, rule: BlockRule, interpret):
    """`tile_top_blocks` of each batch shard: (ids, counts) of unpacked rows' tiles."""
    return _per_batch_shard(
        lambda scores, first, last, kv_blocks: tile_top_blocks(
            scores, first, last, kv_blocks, rule=rule, interpret=interpret),
        scores, first, last, kv_blocks)


def select_blocks(q, k_c, cfg: NSAConfig, S: int, kv_len=None, lse=None, bounds=None,
                  interpret=False, tilings: TritonTilings | None = None, scoring=None):
    """``bounds``: optional `segments.KeyBounds` (packed rows in the aligned layout).
    ``scoring``: a `MosaicScoringConfig` runs the Mosaic GPU compressed-mass kernel instead of
    the Triton one when selection is per tile (the caller checks that it serves the call)."""
    B, T, HQ, D = q.shape
    N_c, H = k_c.shape[1], k_c.shape[2]
    q, k_c = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_c)
    c_bounds = None if bounds is None else bounds.compressed(cfg)
    if lse is None:
        _, lse = compressed_attention(q, k_c, k_c[..., :1], cfg, S, kv_len, c_bounds, interpret,
                                      tilings)
    lse = jax.lax.stop_gradient(lse)
    qt = cfg.select_q_tile
    N_tiles, N_s = -(-T // qt), -(-S // cfg.select_block)
    offsets = key_offsets(B, T, S, kv_len)
    rule = compressed_rule(cfg, N_c)
    t = default_tilings() if tilings is None else tilings
    if qt == 1 and _block_rule(cfg).fused() is None:
        return _per_token(q, k_c, lse, offsets, cfg, S, bounds, c_bounds, interpret,
                          t.scoring_per_token.flash(HQ // H, queries=T))
    if scoring is None:
        mass_kernel, mass_config = compressed_mass, t.scoring.flash(HQ // H, q_tile=qt)
        sub_tiles = qt // min(mass_config.block_q, qt & -qt)
    else:
        mass_kernel, mass_config = mosaic_compressed_mass, scoring
        sub_tiles = qt // cta_queries(HQ // H, qt, scoring)
    # Chunks of whole query tiles, so that the partials stay under MASS_BYTES.
    per_tile = B * H * max(N_c, 1) * 4 * sub_tiles
    chunk_tiles = max(1, min(N_tiles, MASS_BYTES // per_tile))
    n_chunks = -(-N_tiles // chunk_tiles)
    T_c = chunk_tiles * qt
    pad = n_chunks * T_c - T
    q_p = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    lse_p = jnp.pad(lse, ((0, 0), (0, pad), (0, 0)), constant_values=-jnp.inf)
    n_kv_blocks = selection.kv_blocks(B, S, cfg, kv_len)
    block_rule = _block_rule(cfg)
    top_kernel = block_rule.fused() is None and pow2(N_s) <= TOP_MAX_BLOCKS
    if bounds is not None:
        # Padded query rows see nothing; their tiles (past T) choose nothing.
        far = lambda x: jnp.pad(x, ((0, 0), (0, pad)), constant_values=FAR)
        bounds_p, c_bounds_p = tuple(map(far, bounds)), tuple(map(far, c_bounds))

    def chunk(c):
        start = c * T_c
        cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, T_c, axis=1)
        mass = _per_batch_shard(
            lambda q, k_c, lse, offsets, c_bounds: mass_kernel(
                q, k_c, lse, offsets, rule=rule, scale=cfg.softmax_scale(D), q_tile=qt,
                config=mass_config, bounds=c_bounds, interpret=interpret),
            cut(q_p), k_c, cut(lse_p), offsets + start,
            None if bounds is None else tuple(map(cut, c_bounds_p)))  # [B, H, chunk_tiles, N_c]
        scores = selection.block_scores(mass, cfg, N_s)  # [B, H, chunk_tiles, N_s]
        t0 = start + jnp.arange(chunk_tiles, dtype=jnp.int32) * qt
        first, last = selection.tile_span(t0, qt, T, offsets)
        if bounds is None and top_kernel:
            return _top_on_chip(scores, first, last, n_kv_blocks.reshape(B), block_rule,
                                interpret)
        if bounds is None:
            return selection.choose_blocks(scores, first, last, cfg, n_kv_blocks)
        doc = selection.document_blocks(tuple(map(cut, bounds_p)), t0 - start, cfg)
        return selection.choose_blocks(scores, first, last, cfg, *doc)

    if n_chunks == 1:
        ids, counts = chunk(0)
    else:
        ids, counts = jax.lax.map(chunk, jnp.arange(n_chunks))  # [n, B, H, chunk_tiles, ...]
        ids = jnp.moveaxis(ids, 0, 2).reshape(B, H, n_chunks * chunk_tiles, -1)
        counts = jnp.moveaxis(counts, 0, 2).reshape(B, H, n_chunks * chunk_tiles)
    return metadata.BlockSparseIndices(ids[:, :, :N_tiles], counts[:, :, :N_tiles], q_tile=qt,
                                       block_size=cfg.select_block)


def compressed_and_selection(q, k_c, v_c, cfg: NSAConfig, S: int, kv_len=None, interpret=False,
                             tilings: TritonTilings | None = None):
    """(o, lse, selection) of the compressed branch and block scoring with one read of k_c: the
    forward kernel also writes its rows' selection-block partial sums, `scored_block_mass` turns
    them into block scores and `tile_top_blocks` chooses. None for calls of more than
    ``SCORED_MAX_QUERIES`` queries, more than ``SCORED_BYTES`` of sums, or selection rules the
    kernels do not take (`BlockRule.fused`)."""
    B, T, HQ, D = q.shape
    rule = _block_rule(cfg)
    if T > SCORED_MAX_QUERIES or rule.fused() is not None:
        return None
    N_c, H = k_c.shape[1], k_c.shape[2]
    G = HQ // H
    t = default_tilings() if tilings is None else tilings
    fwd = t.scored.flash(G, queries=T)
    # A KV block maps onto at least 16 selection blocks (the block map's matrix product).
    fwd = dataclasses.replace(fwd, block_k=max(fwd.block_k, 16 * rule.per_block))
    lay = Launch.of(q, k_c, v_c, block_q=fwd.block_q, block_k=fwd.block_k)
    n_alloc = -(-lay.num_kv_blocks // SUMS_UNIT) * SUMS_UNIT
    per_row = n_alloc * fwd.block_k // rule.per_block + 2 * (n_alloc + 1)  # part, tail, top
    if B * H * lay.T_p * lay.G_p * per_row * 4 > SCORED_BYTES:
        return None
    fwd = _shared(fwd, "compressed", B * H * lay.num_q_tiles, lay.num_kv_blocks)
    sums = BlockSums(per_block=rule.per_block, overlap=rule.overlap)
    o, lse, sums = _per_batch_shard(
        lambda *a: _scored_vjp(*a, compressed_rule(cfg, N_c), cfg.softmax_scale(D), fwd,
                               t.compressed_bwd.flash(G), sums, interpret),
        q, k_c, v_c, key_offsets(B, T, S, kv_len))
    # Selection is not differentiated (as in `select_blocks`).
    sums, lse_s = jax.lax.stop_gradient(sums), jax.lax.stop_gradient(lse)
    qt = cfg.select_q_tile
    n_tiles, N_s = -(-T // qt), -(-S // cfg.select_block)
    mass = _per_batch_shard(lambda sums, lse: scored_block_mass(sums, lse, interpret=interpret),
                            sums, lse_s)[:, :, :T]  # [B, H, T, blocks]
    mass = jnp.pad(mass, ((0, 0), (0, 0), (0, n_tiles * qt - T), (0, 0)))
    scores = mass.reshape(B, H, n_tiles, qt, -1).sum(axis=3)[..., :N_s]
    scores = jnp.pad(scores, ((0, 0), (0, 0), (0, 0), (0, N_s - scores.shape[-1])))
    first, last = selection.tile_span(jnp.arange(n_tiles, dtype=jnp.int32) * qt, qt, T,
                                      key_offsets(B, T, S, kv_len))
    ids, counts = _top_on_chip(scores, first, last,
                               selection.kv_blocks(B, S, cfg, kv_len).reshape(B), rule, interpret)
    return o, lse, metadata.BlockSparseIndices(ids, counts, q_tile=qt, block_size=cfg.select_block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _scored_vjp(q, k_c, v_c, offsets, rule: MaskRule, scale: float, fwd: FlashConfig,
                bwd: FlashConfig, sums: BlockSums, interpret: bool):
    """(o, lse, block sums) of the range-walk flash forward; the sums' cotangent is dropped (they
    feed only the selection, which is not differentiated)."""
    return flash_forward(q, k_c, v_c, offsets, rule=rule, scale=scale, config=fwd,
                         interpret=interpret, block_sums=sums)


def _scored_fwd(q, k_c, v_c, offsets, rule, scale, fwd, bwd, sums, interpret):
    out = _scored_vjp(q, k_c, v_c, offsets, rule, scale, fwd, bwd, sums, interpret)
    return out, (q, k_c, v_c, offsets, out[0], out[1])


def _scored_bwd(rule, scale, fwd, bwd, sums, interpret, res, ct):
    q, k_c, v_c, offsets, o, lse = res
    do, dlse, _ = ct
    dq, dk, dv = _backward_kernels(q, k_c, v_c, o, lse, do, dlse, offsets, None, None, rule,
                                   scale, fwd.block_k, bwd, 1, interpret, False)
    return dq, dk, dv, _zero_cotangent(offsets)


_scored_vjp.defvjp(_scored_fwd, _scored_bwd)


def _block_rule(cfg: NSAConfig) -> BlockRule:
    d = cfg.compress_stride
    return BlockRule(select_block=cfg.select_block, per_block=cfg.select_block // d,
                     overlap=cfg.compress_block // d, num_selected=cfg.num_selected,
                     num_initial=cfg.num_initial, num_local=cfg.num_local, causal=cfg.causal)


def _per_token(q, k_c, lse, offsets, cfg: NSAConfig, S: int, bounds, c_bounds, interpret,
               tiling: FlashConfig):
    """Per-token selection in one kernel (`kernels/triton/top_blocks.py`)."""
    B, T = q.shape[:2]
    N_s = -(-S // cfg.select_block)
    if bounds is None:
        # offsets + T is each row's key length.
        block_hi = jnp.broadcast_to((-(-(offsets + T) // cfg.select_block))[:, None], (B, T))
        block_lo = jnp.zeros((B, T), jnp.int32)
    else:
        lo, hi = bounds
        ls = cfg.select_block
        block_lo = lo // ls
        block_hi = jnp.where(hi > lo, -(-hi // ls), block_lo)
    ids = _per_batch_shard(
        lambda q, k_c, lse, offsets, block_lo, block_hi, c_bounds: per_token_top_blocks(
            q, k_c, lse, offsets, block_lo, block_hi, num_blocks=N_s,
            token_rule=compressed_rule(cfg, k_c.shape[1]), rule=_block_rule(cfg),
            scale=cfg.softmax_scale(q.shape[-1]), config=tiling, bounds=c_bounds,
            interpret=interpret),
        q, k_c, lse, offsets, block_lo, block_hi, bounds_tuple(c_bounds))
    ids, counts = metadata.compact(ids, ids >= 0)
    return metadata.BlockSparseIndices(ids, counts, q_tile=1, block_size=cfg.select_block)


def bounds_tuple(bounds):
    """Bounds as a plain (lo, hi) tuple: the custom_vjp's residual and cotangent structure."""
    return None if bounds is None else tuple(bounds)


class TritonBackend(base.Backend):
    """Pallas kernels with the Triton lowering: NVIDIA GPUs, or interpret mode on any machine."""

    name = "triton"
    tilings_type = TritonTilings

    def available(self, interpret: bool) -> base.Support:
        if interpret or jax.default_backend() == "gpu":
            return base.YES
        return base.Support(f"needs an NVIDIA GPU (JAX backend is {jax.default_backend()!r}); pass "
                            "interpret=True to run the kernels in interpret mode")

    def supports(self, op: str, config, shapes: base.Shapes) -> base.Support:
        if not config.causal and shapes.per_row_kv_len:
            # Its kernels hide keys past a row's length only through the causal rule.
            return base.Support(f"does not support non-causal {op!r} with a per-row kv_len")
        if op == "selected" and shapes.select_block & -shapes.select_block < 16:
            # The kernel's KV tile is a power of two of at least 16 keys dividing the block.
            return base.Support(f"needs select_block divisible by 16, got {shapes.select_block}")
        return base.YES

    def default_tilings(self, device=None):
        return default_tilings(device)

    def compressed_attention(self, q, k_c, v_c, config, *, S, kv_len, compressed_bounds,
                             interpret, tilings):
        return compressed_attention(q, k_c, v_c, config, S, kv_len, compressed_bounds, interpret,
                                    tilings)

    def select_blocks(self, q, k_c, config, *, S, kv_len, lse, key_bounds, interpret, tilings):
        return select_blocks(q, k_c, config, S, kv_len, lse, key_bounds, interpret, tilings)

    def compressed_and_selection(self, q, k_c, v_c, config, *, S, kv_len, interpret, tilings):
        return compressed_and_selection(q, k_c, v_c, config, S, kv_len, interpret, tilings)

    def selected_attention(self, q, k, v, sel, config, *, kv_len, key_bounds, interpret, tilings):
        return selected_attention(q, k, v, sel, config, key_bounds, interpret, tilings,
                                  kv_len=kv_len)

    def sliding_window_attention(self, q, k, v, config, *, kv_len, key_bounds, interpret,
                                 tilings):
        return sliding_window_attention(q, k, v, config, key_bounds, interpret, tilings,
                                        kv_len=kv_len)


BACKEND = TritonBackend()
