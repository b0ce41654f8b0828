"""Input validation shared by every public entry point (the API, the reference, the layer):
clear errors naming the argument and its values, before any tracing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import ops
from nsa_jax.config import NSAConfig

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
IMPLEMENTATIONS = ops.NAMES


def config(cfg) -> NSAConfig:
    if not isinstance(cfg, NSAConfig):
        raise TypeError(f"config must be an nsa_jax.NSAConfig, got {type(cfg).__name__}")
    return cfg


def options(cfg, implementation_, interpret_, tilings_) -> None:
    """The arguments every public function shares, besides the arrays."""
    config(cfg)
    implementation(implementation_)
    interpret(interpret_)
    tilings(tilings_)


def implementation(impl) -> None:
    if impl is not None and impl not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={impl!r} is unknown; use None or one of {IMPLEMENTATIONS}")


def interpret(x) -> None:
    if not isinstance(x, bool):
        raise TypeError(f"interpret must be a bool, got {x!r} ({type(x).__name__})")


def tilings(t) -> None:
    """None, or the tilings of one backend (a backend ignores another backend's tilings)."""
    if t is None:
        return
    types = ops.tilings_types()
    if not isinstance(t, types):
        names = " or ".join(f"nsa_jax.{c.__name__}" for c in types)
        raise TypeError(f"tilings must be an {names} or None, got {type(t).__name__}")


def positive_int(name: str, value, *, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int" + (" or None" if allow_none else ""))


def effective(cfg: NSAConfig, S: int, T: int) -> NSAConfig:
    """``cfg`` with a window longer than any distance between a query and a key (max(S, T))
    shortened to that: the same keys, at no cost that grows with the window."""
    if cfg.window > max(S, T, 1):
        return dataclasses.replace(cfg, window=max(S, T, 1))
    return cfg


def floating(name: str, x, *, wide: bool = False) -> None:
    """``wide``: float64 is accepted too (the reference and compression, for float64 checks)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be a JAX or NumPy array, got {type(x).__name__}")
    allowed = FLOAT_DTYPES + ((jnp.float64,) if wide else ())
    if not any(np.dtype(dtype) == np.dtype(d) for d in allowed):
        raise TypeError(f"{name}.dtype={np.dtype(dtype).name} must be float32, bfloat16 or float16"
                        + (" (or float64)" if wide else ""))


def rank(name: str, x, n: int, layout: str) -> None:
    if getattr(x, "ndim", None) != n:
        raise ValueError(f"{name} must have rank {n} ({layout}), got shape {getattr(x, 'shape', None)}")


def accumulation(*xs):
    """float64 if any input is float64, else float32: the dtype exact paths compute in."""
    return jnp.float64 if any(np.dtype(x.dtype) == np.float64 for x in xs) else jnp.float32


def same_dtype(**arrays) -> None:
    dtypes = {k: np.dtype(v.dtype).name for k, v in arrays.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"inputs must share one dtype, got {dtypes}")


def qkv(q, k, v, *, causal: bool, wide: bool = False):
    """Checks q [B, T, HQ, D], k [B, S, H, D], v [B, S, H, Dv]; returns (B, T, S, HQ, H, D, Dv).
    B, T and S may be 0 (empty outputs); the head counts and dims may not."""
    rank("q", q, 4, "[B, T, HQ, D]")
    rank("k", k, 4, "[B, S, H, D]")
    rank("v", v, 4, "[B, S, H, Dv]")
    for name, x in (("q", q), ("k", k), ("v", v)):
        floating(name, x, wide=wide)
    same_dtype(q=q, k=k, v=v)
    B, T, HQ, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same length S: k {k.shape}, v {v.shape}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of heads H: k {k.shape}, v {v.shape}")
    if k.shape[3] != D:
        raise ValueError(f"q and k must have the same head dim D: q {q.shape}, k {k.shape}")
    S, H, Dv = k.shape[1], k.shape[2], v.shape[3]
    heads(HQ, H)
    head_dims(D, Dv)
    if causal and S < T:
        raise ValueError(f"causal attention needs S >= T (queries sit at the end of the keys), "
                         f"got T={T} from q {q.shape} and S={S} from k {k.shape}")
    return B, T, S, HQ, H, D, Dv


def heads(HQ: int, H: int) -> None:
    if H < 1 or HQ < 1 or HQ % H:
        raise ValueError(f"query heads HQ={HQ} must be a multiple of KV heads H={H}, both positive")


def head_dims(D: int, Dv: int) -> None:
    if D < 1 or Dv < 1:
        raise ValueError(f"head dims must be positive, got D={D} (q, k) and Dv={Dv} (v)")


def compressed_inputs(q, k_c, v_c=None, *, wide: bool = False):
    """Checks q [B, T, HQ, D], k_c [B, N_c, H, D] and v_c [B, N_c, H, Dv] (if given); returns
    (B, T, HQ, H, D, Dv) (Dv = D without v_c)."""
    rank("q", q, 4, "[B, T, HQ, D]")
    rank("k_c", k_c, 4, "[B, N_c, H, D]")
    floating("q", q, wide=wide)
    floating("k_c", k_c, wide=wide)
    arrays = {"q": q, "k_c": k_c}
    if v_c is not None:
        rank("v_c", v_c, 4, "[B, N_c, H, Dv]")
        floating("v_c", v_c, wide=wide)
        arrays["v_c"] = v_c
        if v_c.shape[:3] != k_c.shape[:3]:
            raise ValueError(f"k_c and v_c must agree on [B, N_c, H]: k_c {k_c.shape}, v_c {v_c.shape}")
    same_dtype(**arrays)
    if k_c.shape[0] != q.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape}, k_c {k_c.shape}")
    if k_c.shape[3] != q.shape[3]:
        raise ValueError(f"q and k_c must have the same head dim D: q {q.shape}, k_c {k_c.shape}")
    B, T, HQ, D = q.shape
    H = k_c.shape[2]
    heads(HQ, H)
    Dv = D if v_c is None else v_c.shape[3]
    head_dims(D, Dv)
    return B, T, HQ, H, D, Dv


def lse(x, B: int, T: int, HQ: int) -> None:
    if x is None:
        return
    floating("lse", x, wide=True)
    if tuple(x.shape) != (B, T, HQ):
        raise ValueError(f"lse must have shape [B, T, HQ] = {(B, T, HQ)}, got {tuple(x.shape)}")


def selection(sel, B: int, T: int, H: int, packed: bool) -> None:
    """``sel``: `BlockSparseIndices` covering T query rows (the aligned layout's when packed), or
    per-token integer indices [B, T, H, n] (not with packed rows)."""
    from nsa_jax.metadata import BlockSparseIndices
    if isinstance(sel, BlockSparseIndices):
        want = (B, H, -(-T // sel.q_tile))
        if tuple(sel.indices.shape[:3]) != want or tuple(sel.counts.shape) != want:
            raise ValueError(f"BlockSparseIndices must have indices [B, H, N_tiles, k] and counts "
                             f"[B, H, N_tiles] with (B, H, N_tiles) = {want} (q_tile={sel.q_tile}"
                             f"{', aligned layout' if packed else ''}), got indices "
                             f"{sel.indices.shape}, counts {sel.counts.shape}")
        return
    if packed:
        raise TypeError("with segment_ids, sel must be the BlockSparseIndices of select_blocks "
                        f"(aligned layout), got {type(sel).__name__}")
    shape = tuple(getattr(sel, "shape", ()))
    if len(shape) != 4 or shape[:3] != (B, T, H):
        raise ValueError(f"per-token indices must have shape [B, T, H, n] with (B, T, H) = "
                         f"{(B, T, H)}, got {shape or type(sel).__name__}")
    if not jnp.issubdtype(sel.dtype, jnp.integer):
        raise TypeError(f"indices.dtype={sel.dtype} must be an integer type")


def packed(segment_ids, max_segments, B: int, T: int, S: int, kv_len=None) -> None:
    """``segment_ids`` int [B, T] (or None) for packed self-attention, and its ``max_segments``."""
    if segment_ids is None:
        return
    shape = tuple(getattr(segment_ids, "shape", ()))
    dtype = getattr(segment_ids, "dtype", None)
    if shape != (B, T):
        raise ValueError(f"segment_ids must have shape [B, T] = {(B, T)}, got {shape}")
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"segment_ids.dtype={dtype} must be an integer type")
    if S != T:
        raise ValueError(f"segment_ids need S == T (packed self-attention), got T={T}, S={S}")
    if kv_len is not None:
        raise ValueError("kv_len must be None with segment_ids (packed self-attention)")
    positive_int("max_segments", max_segments, allow_none=True)


def gates(g, B: int, T: int, HQ: int, *, wide: bool = False) -> None:
    if g is None:
        return
    floating("g", g, wide=wide)
    if tuple(g.shape) != (B, T, HQ, 3):
        raise ValueError(f"g must have shape [B, T, HQ, 3] = {(B, T, HQ, 3)}, got {tuple(g.shape)}")


def key_lengths(kv_len, B: int, T: int, S: int, *, causal: bool):
    """``kv_len`` of the branches over raw keys (k [B, S, ...]): None, an int in [T, S] (or
    [0, S] non-causal) or int32[B] (range-checked when concrete); returns None when it means all
    S keys, else int32[B]."""
    if kv_len is None:
        return None
    scalar = isinstance(kv_len, (int, np.integer)) and not isinstance(kv_len, bool)
    if scalar:
        shown = n = int(kv_len)
    else:
        _row_lengths(kv_len, B)
        n = None if isinstance(kv_len, jax.core.Tracer) or not B else np.asarray(kv_len)
        shown = None if n is None else n.tolist()
    lo = T if causal else 0
    if n is not None and (np.min(n) < lo or np.max(n) > S):
        raise ValueError(f"kv_len={shown} must lie in [{lo}, S={S}]"
                         + (f" (T={T} queries sit at the end of causal keys)" if causal else ""))
    if scalar:
        return None if n == S else jnp.full((B,), n, jnp.int32)
    return jnp.asarray(kv_len, jnp.int32)


def _row_lengths(kv_len, B: int) -> None:
    shape = getattr(kv_len, "shape", None)
    if shape is None or tuple(shape) != (B,) or not jnp.issubdtype(kv_len.dtype, jnp.integer):
        raise TypeError(f"kv_len must be an int or an int32[B={B}] array, got {kv_len!r}")


def kv_len(kv_len, B: int, T: int, N_c: int, cfg: NSAConfig, *, causal: bool):
    """Normalises ``kv_len`` to (static upper bound S, int32[B] array or None)."""
    if kv_len is None:
        kv_len = T
    if isinstance(kv_len, (int, np.integer)) and not isinstance(kv_len, bool):
        S = int(kv_len)
        if causal and S < T:
            raise ValueError(f"kv_len={S} must be >= T={T} for causal attention")
        if cfg.num_compressed(S) != N_c:
            raise ValueError(f"kv_len={S} gives {cfg.num_compressed(S)} compressed tokens with "
                             f"compress_block={cfg.compress_block}, compress_stride="
                             f"{cfg.compress_stride}, but k_c has N_c={N_c}")
        return S, None
    _row_lengths(kv_len, B)
    # The largest S consistent with N_c compressed tokens.
    S = N_c * cfg.compress_stride + cfg.compress_block - 1
    return max(S, T), jnp.asarray(kv_len, jnp.int32)
