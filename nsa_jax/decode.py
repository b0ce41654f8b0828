"""Generation: a per-layer KV cache with incremental compression, and attention of new tokens
over it (docs/design.md §5.5).

`NSACache` holds, for a static maximum length S_max, the raw keys and values, the compressed
tokens completed so far and each row's length. `nsa_decode` appends one or more new tokens per
row, compresses every block the new keys complete (from the cached keys of that block only), and
runs the three branches for the new queries with per-row lengths, so one compiled step serves
every length. Prefill is the same call with the prompt (or a chunk of it) as the new tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from nsa_jax import _checks, parallel
from nsa_jax.api import attend_with_lengths
from nsa_jax.compression import apply_phi, block_view, check_params
from nsa_jax.config import NSAConfig


# Cache lengths are multiples of this: a multiple of every key block the kernels use.
CACHE_UNIT = 128


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("k", "v", "k_c", "v_c", "lengths"),
                   meta_fields=("compress_block", "compress_stride"))
@dataclasses.dataclass(frozen=True)
class NSACache:
    """The decode state of one NSA layer (a pytree; all leaves are arrays).

    Attributes:
      k: [B, S_max, H, D] keys; slots at or past a row's length hold zeros.
      v: [B, S_max, H, Dv] values, likewise.
      k_c: [B, N_max, H, D] compressed keys, N_max = `compressed_room` (the tokens S_max keys
        give, rounded up to a multiple of `CACHE_UNIT`); token i of a row is filled once its
        block is complete (i * d + l <= length), zeros before.
      v_c: [B, N_max, H, Dv] compressed values, likewise.
      lengths: int32[B] tokens cached per row.
      compress_block, compress_stride: the l and d its compressed tokens were made with (static).
    """

    k: jax.Array
    v: jax.Array
    k_c: jax.Array
    v_c: jax.Array
    lengths: jax.Array
    compress_block: int
    compress_stride: int

    @property
    def max_length(self) -> int:
        return self.k.shape[1]


def compressed_room(config: NSAConfig, max_length: int) -> int:
    """Slots for compressed tokens in a cache of ``max_length`` keys: the tokens it can complete,
    rounded up to a multiple of `CACHE_UNIT` (slots past them stay zero and are never visible)."""
    return -(-config.num_compressed(max_length) // CACHE_UNIT) * CACHE_UNIT


def init_cache(batch: int, max_length: int, num_kv_heads: int, head_dim: int,
               v_head_dim: int | None = None, *, config: NSAConfig, dtype=jnp.float32
               ) -> NSACache:
    """An empty cache for ``batch`` rows of at least ``max_length`` tokens (all lengths 0).

    The room is ``max_length`` rounded up to a multiple of `CACHE_UNIT` (`NSACache.max_length`
    says how much), so the Pallas kernels read the cache in place instead of a padded copy.
    """
    _checks.config(config)
    for name, val in (("batch", batch), ("max_length", max_length),
                      ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                      ("v_head_dim", v_head_dim)):
        _checks.positive_int(name, val, allow_none=name == "v_head_dim")
    Dv = head_dim if v_head_dim is None else v_head_dim
    _checks.head_dims(head_dim, Dv)
    max_length = -(-max_length // CACHE_UNIT) * CACHE_UNIT
    N = compressed_room(config, max_length)
    zeros = lambda n, width: jnp.zeros((batch, n, num_kv_heads, width), dtype)
    return NSACache(zeros(max_length, head_dim), zeros(max_length, Dv), zeros(N, head_dim),
                    zeros(N, Dv), jnp.zeros((batch,), jnp.int32), config.compress_block,
                    config.compress_stride)


def append(cache: NSACache, k, v, *, config: NSAConfig, compress_params=None, num_new=None
           ) -> NSACache:
    """``cache`` with k [B, T, H, D] and v [B, T, H, Dv] written at each row's length.

    Row b takes its first ``num_new[b]`` tokens (int32[B]; default all T); the rest of the T
    slots are written as zeros and not counted. Compressed tokens whose blocks the new keys
    complete are computed from the cache. The caller keeps ``lengths + T <= max_length``
    (`nsa_decode` checks it outside `jax.jit`); past it, tokens are dropped, lengths stop at
    max_length and attention over such a row is not meaningful.
    """
    B, T = k.shape[:2]
    S_max, N_max = cache.k.shape[1], cache.k_c.shape[1]
    l, d = config.compress_block, config.compress_stride
    old = cache.lengths
    n = jnp.full((B,), T, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    new = jnp.minimum(old + n, S_max)
    t = jnp.arange(T, dtype=jnp.int32)
    real = (t[None, :] < n[:, None])[..., None, None]  # [B, T, 1, 1]
    slot = old[:, None] + t[None, :]  # [B, T]
    rows = jnp.arange(B)[:, None]

    def write(buf, x):
        x = jnp.where(real, x.astype(buf.dtype), jnp.zeros((), buf.dtype))
        return buf.at[rows, slot].set(x, mode="drop")

    k_all, v_all = write(cache.k, k), write(cache.v, v)
    if N_max == 0:
        return dataclasses.replace(cache, k=k_all, v=v_all, lengths=new)
    # Blocks complete before and after: count(len) = max(0, (len - l) // d + 1).
    first = jnp.maximum((old - l) // d + 1, 0)  # [B]
    done = jnp.maximum((new - l) // d + 1, 0)
    K = -(-T // d)  # the most blocks T new keys can complete
    span = (K - 1) * d + l  # keys of K consecutive blocks
    idx = jnp.clip(first[:, None] * d + jnp.arange(span)[None, :], 0, S_max - 1)  # [B, span]
    j = first[:, None] + jnp.arange(K)[None, :]  # [B, K] compressed token ids
    target = jnp.where(j < done[:, None], j, N_max)  # N_max: dropped

    def compressed(buf, x_all, which):
        keys = jnp.take_along_axis(x_all, idx[:, :, None, None], axis=1)  # [B, span, H, D]
        blocks = block_view(keys.astype(_checks.accumulation(keys)), config)  # [B, K, l, H, D]
        c = apply_phi(blocks, compress_params, which, config).astype(buf.dtype)
        return buf.at[rows, target].set(c, mode="drop")

    return dataclasses.replace(cache, k=k_all, v=v_all, k_c=compressed(cache.k_c, k_all, "_k"),
                               v_c=compressed(cache.v_c, v_all, "_v"), lengths=new)


def nsa_decode(q, k, v, g, cache: NSACache, *, config: NSAConfig, compress_params=None,
               num_new=None, implementation=None, interpret: bool = False, tilings=None,
               mesh_axes=None):
    """Attention of T new tokens per row over the cache and themselves; the cache updated.

    Equal (within rounding) to `nsa_attention` over each row's whole sequence, at the new
    positions, with one difference for ``select_q_tile > 1``: queries are tiled from each call's
    first new token, so a tile-shared selection matches the full forward when each call starts
    at a multiple of ``select_q_tile`` and brings whole tiles (prefill chunks) of real tokens; a
    single-token step selects for that token alone, and a row's padding tokens (past
    ``num_new``) take part in the selection of the tile they share with its last real tokens.

    Args:
      q: [B, T, HQ, D] new queries (rotated for their positions ``lengths + t`` if using RoPE).
      k: [B, T, H, D], v: [B, T, H, Dv] new keys and values.
      g: [B, T, HQ, 3] gates or None (1/3 each).
      cache: `NSACache` from `init_cache` (same dtype as q) or an earlier call.
      config: `NSAConfig` with ``causal=True``.
      compress_params: phi's parameters, as for `nsa_attention`.
      num_new: int32[B] in [0, T], the tokens of the T that row b really appends (prompts of
        different lengths; its queries past that get zeros); default T for every row.
      implementation, interpret, tilings: as in `nsa_attention`.
      mesh_axes: as in `nsa_attention`, batch and heads only (a cache sharded over B, or over
        its KV heads with q's groups); read from q's type under explicit mesh axes.

    Returns:
      (o [B, T, HQ, Dv] in q.dtype, the updated `NSACache`).
    """
    _checks.options(config, implementation, interpret, tilings)
    if not config.causal:
        raise ValueError("nsa_decode needs a causal config (config.causal=True): generation "
                         "appends tokens after the cached ones")
    if not isinstance(cache, NSACache):
        raise TypeError(f"cache must be an NSACache (from init_cache), got {type(cache).__name__}")
    B, T, T_k, HQ, H, D, Dv = _checks.qkv(q, k, v, causal=False)
    if T_k != T:
        raise ValueError(f"q, k and v must hold the same T new tokens: q {q.shape}, k {k.shape}")
    _checks.gates(g, B, T, HQ)
    check_params(config, compress_params, H, D, Dv)
    S_max = cache.max_length
    want = {"k": (B, S_max, H, D), "v": (B, S_max, H, Dv)}
    for name, shape in want.items():
        if tuple(getattr(cache, name).shape) != shape:
            raise ValueError(f"cache.{name} has shape {tuple(getattr(cache, name).shape)}, but the "
                             f"new tokens need {shape} (B, S_max, H, D or Dv)")
    made = (cache.compress_block, cache.compress_stride)
    if made != (config.compress_block, config.compress_stride):
        raise ValueError(f"the cache was made for compress_block, compress_stride = {made}, not "
                         f"{(config.compress_block, config.compress_stride)}: another config")
    room = compressed_room(config, S_max)
    if cache.k_c.shape[1] != room or cache.v_c.shape[1] != room:
        raise ValueError(f"cache.k_c and cache.v_c hold {cache.k_c.shape[1]} and "
                         f"{cache.v_c.shape[1]} compressed slots; this config needs {room} for "
                         f"S_max={S_max}: the cache was made for another config")
    for name in ("k", "v", "k_c", "v_c"):
        if getattr(cache, name).dtype != q.dtype:
            raise TypeError(f"cache.{name}.dtype={getattr(cache, name).dtype} differs from "
                            f"q.dtype={q.dtype}: create the cache with init_cache(..., "
                            f"dtype={q.dtype})")
    if num_new is not None:
        if (tuple(getattr(num_new, "shape", ())) != (B,)
                or not jnp.issubdtype(getattr(num_new, "dtype", float), jnp.integer)):
            raise TypeError(f"num_new must be an int32[B={B}] array, got {num_new!r}")
        if not isinstance(num_new, jax.core.Tracer) and B and not (
                0 <= int(jnp.min(num_new)) and int(jnp.max(num_new)) <= T):
            raise ValueError(f"num_new={jnp.asarray(num_new).tolist()} must lie in [0, T={T}]")
    if T > S_max:
        raise ValueError(f"T={T} new tokens do not fit a cache of max_length={S_max}")
    if not isinstance(cache.lengths, jax.core.Tracer):
        top = int(jnp.max(cache.lengths)) + T if B else 0
        if top > S_max:
            raise ValueError(f"cache lengths {cache.lengths.tolist()} + T={T} exceed "
                             f"max_length={S_max}")
    if B == 0 or T == 0:
        return jnp.zeros((B, T, HQ, Dv), q.dtype), cache
    options = dict(config=config, implementation=implementation, interpret=interpret,
                   tilings=tilings)
    if mesh_axes is not None and not isinstance(mesh_axes, parallel.MeshAxes):
        raise TypeError(f"mesh_axes must be an nsa_jax.MeshAxes or None, got {mesh_axes!r}")
    axes = parallel.from_types(q) if mesh_axes is None or not mesh_axes.any() else mesh_axes
    if axes is None:
        return _step(q, k, v, g, cache, num_new, compress_params, **options)
    if axes.context is not None:
        raise ValueError(f"nsa_decode does not split the sequence, but mesh axis "
                         f"{axes.context!r} shards T: shard B (batch) or the heads")
    mesh = parallel.check(axes, config, B, T, S_max, H, packed=False)
    return parallel.run_decode(functools.partial(_step, **options), axes, mesh, q, k, v, g,
                               cache, num_new, compress_params, config=config)


def _step(q, k, v, g, cache: NSACache, num_new, compress_params, **options):
    """`nsa_decode` on validated, non-empty inputs of one device."""
    # Queries sit at old length + t: the keys seen end T past the old length in every row.
    n = cache.lengths + q.shape[1]
    cache = append(cache, k, v, config=options["config"], compress_params=compress_params,
                   num_new=num_new)
    o = attend_cache(q, g, cache, n, **options)
    if num_new is not None:
        real = jnp.arange(q.shape[1])[None, :] < num_new[:, None]
        o = jnp.where(real[..., None, None], o, jnp.zeros((), o.dtype))
    return o, cache


def attend_cache(q, g, cache: NSACache, kv_len, *, config: NSAConfig, implementation=None,
                 interpret: bool = False, tilings=None):
    """The three branches and the gate for q [B, T, HQ, D] at positions kv_len - T + t over a
    cache already holding them (inputs validated by `nsa_decode`)."""
    return attend_with_lengths(q, cache.k, cache.v, cache.k_c, cache.v_c, g, kv_len,
                               config=config, implementation=implementation,
                               interpret=interpret, tilings=tilings)[0]
