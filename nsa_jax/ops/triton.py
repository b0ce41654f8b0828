"""The "triton" implementation: the three branches on the Pallas flash core (Triton lowering).

Forward and backward run kernels. Each branch is a `jax.custom_vjp` whose residuals are O(T): the
inputs, the branch output, its log-sum-exp and the compact selection metadata. The backward
recomputes probabilities tile by tile (`kernels/flash_bwd.py`): dQ walks the forward's KV blocks,
dK/dV walk the query tiles that see each KV block (the reverse map for the selected branch), with
no atomics. Block scoring runs the compressed-mass kernel; the linear map onto selection blocks
and top-n stay in XLA; selection is not differentiated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import metadata, segments
from nsa_jax.ops import xla
from nsa_jax.config import NSAConfig
from nsa_jax.kernels.triton.block_scores import compressed_mass
from nsa_jax.kernels.triton.flash_bwd import flash_backward
from nsa_jax.kernels.triton.flash_fwd import FAR, FlashConfig, MaskRule, flash_forward
from nsa_jax.kernels.triton.tiling import TritonTilings, default_tilings

# Upper bound on the float32 compressed-mass array scoring materialises at once; longer inputs
# are scored in chunks of query tiles.
MASS_BYTES = 1 << 29


def check_available(interpret: bool) -> None:
    if not interpret and jax.default_backend() != "gpu":
        raise RuntimeError(
            f"implementation='triton' needs an NVIDIA GPU (JAX backend is "
            f"{jax.default_backend()!r}); pass interpret=True to run the kernels in interpret mode")


def tilings_or_default(tilings: TritonTilings | None) -> TritonTilings:
    return default_tilings() if tilings is None else tilings


def _offsets(B: int, T: int, S: int, kv_len=None):
    if kv_len is None:
        return jnp.full((B,), S - T, jnp.int32)
    return (kv_len - T).astype(jnp.int32)


def _zero_cotangent(x):
    return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10, 11))
def _flash(q, k, v, offsets, sel, bounds, rule: MaskRule, scale: float, fwd: FlashConfig,
           bwd: FlashConfig, q_tile: int, interpret: bool):
    """(o, lse) of the flash core over a block range (``sel`` None) or the KV blocks of
    ``sel = (indices, counts)`` (selection tiles of ``q_tile`` queries, blocks of ``fwd.block_k``),
    within the per-query key ``bounds`` = (lo, hi) of packed rows if given."""
    return _flash_fwd(q, k, v, offsets, sel, bounds, rule, scale, fwd, bwd, q_tile, interpret)[0]


def _flash_fwd(q, k, v, offsets, sel, bounds, rule, scale, fwd, bwd, q_tile, interpret):
    table, counts = (None, None) if sel is None else sel
    o, lse = flash_forward(q, k, v, offsets, rule=rule, scale=scale, config=fwd, table=table,
                           counts=counts, table_q_tile=q_tile, bounds=bounds, interpret=interpret)
    return (o, lse), (q, k, v, offsets, sel, bounds, o, lse)


def _flash_bwd(rule, scale, fwd, bwd, q_tile, interpret, res, ct):
    q, k, v, offsets, sel, bounds, o, lse = res
    do, dlse = ct
    kw = {}
    if sel is not None:
        n_kb = -(-k.shape[1] // bwd.block_k)
        blocks = metadata.reblock(metadata.BlockSparseIndices(*sel, q_tile=q_tile,
                                                              block_size=fwd.block_k),
                                  bwd.block_k, n_kb)
        rev = metadata.reverse_map(blocks, n_kb)
        kw = dict(table=blocks.indices, counts=blocks.counts, table_q_tile=q_tile,
                  reverse_tiles=rev.tiles, reverse_offsets=rev.offsets)
    dq, dk, dv = flash_backward(q, k, v, o, lse, do, dlse, offsets, rule=rule, scale=scale,
                                config=bwd, bounds=bounds, interpret=interpret, **kw)
    zeros = [None if x is None else tuple(_zero_cotangent(a) for a in x) for x in (sel, bounds)]
    return dq, dk, dv, _zero_cotangent(offsets), *zeros


_flash.defvjp(_flash_fwd, _flash_bwd)


def supports_compressed(cfg: NSAConfig, kv_len) -> bool:
    """Non-causal compressed attention with a per-row kv_len is not covered yet."""
    return cfg.causal or kv_len is None


def supports_block(select_block: int) -> bool:
    """Selection blocks need a power-of-two KV tile of at least 16 keys dividing them."""
    return select_block & -select_block >= 16


def _compressed_rule(cfg: NSAConfig, N_c: int) -> MaskRule:
    return MaskRule(num_keys=N_c, key_stride=cfg.compress_stride,
                    key_offset=cfg.compress_block - 1, causal=cfg.causal)


def compressed_attention(q, k_c, v_c, cfg: NSAConfig, S: int, kv_len=None, interpret=False,
                         tilings=None, bounds=None):
    B, T, HQ, D = q.shape
    H = k_c.shape[2]
    if not supports_compressed(cfg, kv_len):
        raise NotImplementedError("implementation='triton': non-causal compressed attention with "
                                  "per-row kv_len is not supported yet")
    t = tilings_or_default(tilings)
    return _flash(q, k_c, v_c, _offsets(B, T, S, kv_len), None, bounds,
                  _compressed_rule(cfg, k_c.shape[1]),
                  cfg.softmax_scale(D), t.compressed.flash(HQ // H), t.compressed_bwd.flash(HQ // H),
                  1, interpret)


def selected_attention(q, k, v, sel: metadata.BlockSparseIndices, cfg: NSAConfig, interpret=False,
                       tilings=None, bounds=None):
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    G = HQ // H
    if not supports_block(sel.block_size):
        raise NotImplementedError(
            f"implementation='triton' needs select_block divisible by 16, got {sel.block_size}")
    t = tilings_or_default(tilings)
    fwd = (t.selected_per_token if sel.q_tile == 1 else t.selected).flash(
        G, q_tile=sel.q_tile, block_k_divides=sel.block_size)
    bwd = t.selected_bwd.flash(G, q_tile=sel.q_tile, block_k_divides=sel.block_size)
    blocks = metadata.reblock(sel, fwd.block_k, -(-S // fwd.block_k))
    o, _ = _flash(q, k, v, _offsets(B, T, S), (blocks.indices, blocks.counts), bounds,
                  MaskRule(num_keys=S, causal=cfg.causal), cfg.softmax_scale(D), fwd, bwd,
                  sel.q_tile, interpret)
    return o


def sliding_window_attention(q, k, v, cfg: NSAConfig, interpret=False, tilings=None, bounds=None):
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    t = tilings_or_default(tilings)
    o, _ = _flash(q, k, v, _offsets(B, T, S), None, bounds,
                  MaskRule(num_keys=S, causal=cfg.causal, window=cfg.window), cfg.softmax_scale(D),
                  t.window.flash(HQ // H), t.window_bwd.flash(HQ // H), 1, interpret)
    return o


def select_blocks(q, k_c, cfg: NSAConfig, S: int, kv_len=None, lse=None, interpret=False,
                  tilings=None, bounds=None):
    B, T, HQ, D = q.shape
    N_c, H = k_c.shape[1], k_c.shape[2]
    q, k_c = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_c)
    c_bounds = None if bounds is None else segments.compressed_bounds(*bounds, cfg)
    if lse is None:
        _, lse = compressed_attention(q, k_c, k_c[..., :1], cfg, S, kv_len, interpret, tilings,
                                      c_bounds)
    lse = jax.lax.stop_gradient(lse)
    qt = cfg.select_q_tile
    N_tiles, N_s = -(-T // qt), -(-S // cfg.select_block)
    offsets = _offsets(B, T, S, kv_len)
    rule = _compressed_rule(cfg, N_c)
    tiling = tilings_or_default(tilings).scoring.flash(HQ // H, q_tile=qt)
    # Chunks of whole query tiles, so that the mass array stays under MASS_BYTES.
    per_tile = B * H * max(N_c, 1) * 4
    chunk_tiles = max(1, min(N_tiles, MASS_BYTES // per_tile))
    n_chunks = -(-N_tiles // chunk_tiles)
    T_c = chunk_tiles * qt
    pad = n_chunks * T_c - T
    q_p = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    lse_p = jnp.pad(lse, ((0, 0), (0, pad), (0, 0)), constant_values=-jnp.inf)
    n_kv_blocks = xla.kv_blocks(B, S, cfg, kv_len)
    if bounds is not None:
        # Padded query rows see nothing; their tiles (past T) choose nothing.
        bounds_p = [jnp.pad(x, ((0, 0), (0, pad)), constant_values=FAR) for x in bounds]
        c_bounds_p = [jnp.pad(x, ((0, 0), (0, pad)), constant_values=FAR) for x in c_bounds]

    def chunk(c):
        start = c * T_c
        q_c = jax.lax.dynamic_slice_in_dim(q_p, start, T_c, axis=1)
        lse_c = jax.lax.dynamic_slice_in_dim(lse_p, start, T_c, axis=1)
        cut = lambda x: jax.lax.dynamic_slice_in_dim(x, start, T_c, axis=1)
        mass = compressed_mass(q_c, k_c, lse_c, offsets + start, rule=rule,
                               scale=cfg.softmax_scale(D), q_tile=qt, config=tiling,
                               bounds=None if bounds is None else [cut(x) for x in c_bounds_p],
                               interpret=interpret)  # [B, H, chunk_tiles, N_c]
        scores = xla.block_scores_from_probs(mass, cfg, N_s)  # [B, H, chunk_tiles, N_s]
        t0 = start + jnp.arange(chunk_tiles, dtype=jnp.int32) * qt
        first = t0[None] + offsets[:, None]
        last = jnp.minimum(t0 + qt - 1, T - 1)[None] + offsets[:, None]
        if bounds is None:
            return xla.choose_blocks(scores, first, last, cfg, n_kv_blocks)
        doc = xla.document_blocks([cut(x) for x in bounds_p], t0 - start, cfg)
        return xla.choose_blocks(scores, first, last, cfg, *doc)

    if n_chunks == 1:
        ids, counts = chunk(0)
    else:
        ids, counts = jax.lax.map(chunk, jnp.arange(n_chunks))  # [n, B, H, chunk_tiles, ...]
        ids = jnp.moveaxis(ids, 0, 2).reshape(B, H, n_chunks * chunk_tiles, -1)
        counts = jnp.moveaxis(counts, 0, 2).reshape(B, H, n_chunks * chunk_tiles)
    return metadata.BlockSparseIndices(ids[:, :, :N_tiles], counts[:, :, :N_tiles], q_tile=qt,
                                       block_size=cfg.select_block)
