"""Input validation shared by every public entry point: clear errors before any tracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.config import NSAConfig
from nsa_jax.kernels.triton.tiling import TritonTilings

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
IMPLEMENTATIONS = ("reference", "xla", "triton", "mosaic")


def config(cfg) -> NSAConfig:
    if not isinstance(cfg, NSAConfig):
        raise TypeError(f"config must be an nsa_jax.NSAConfig, got {type(cfg).__name__}")
    return cfg


def tilings(t) -> None:
    if t is not None and not isinstance(t, TritonTilings):
        raise TypeError(f"tilings must be an nsa_jax.TritonTilings or None, got {type(t).__name__}")


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
    """Checks q [B, T, HQ, D], k [B, S, H, D], v [B, S, H, Dv]; returns (B, T, S, HQ, H, D, Dv)."""
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
    if causal and S < T:
        raise ValueError(f"causal attention needs S >= T (queries sit at the end of the keys), "
                         f"got T={T} from q {q.shape} and S={S} from k {k.shape}")
    return B, T, S, HQ, H, D, Dv


def heads(HQ: int, H: int) -> None:
    if H == 0 or HQ % H:
        raise ValueError(f"query heads HQ={HQ} must be a multiple of KV heads H={H}")


def gates(g, B: int, T: int, HQ: int, *, wide: bool = False) -> None:
    if g is None:
        return
    floating("g", g, wide=wide)
    if tuple(g.shape) != (B, T, HQ, 3):
        raise ValueError(f"g must have shape [B, T, HQ, 3] = {(B, T, HQ, 3)}, got {tuple(g.shape)}")


def implementation(impl) -> str:
    """The implementation to run; None picks "triton" on a GPU and "xla" elsewhere."""
    if impl is None:
        return "triton" if jax.default_backend() == "gpu" else "xla"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={impl!r} is unknown; use None or one of {IMPLEMENTATIONS}")
    if impl == "mosaic":
        raise NotImplementedError(
            "implementation='mosaic' is not yet available: the Mosaic GPU kernels have not "
            "landed; use implementation='triton' or 'xla'")
    return impl


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
    shape = getattr(kv_len, "shape", None)
    if shape is None or tuple(shape) != (B,) or not jnp.issubdtype(kv_len.dtype, jnp.integer):
        raise TypeError(f"kv_len must be an int or an int32[B={B}] array, got {kv_len!r}")
    # The largest S consistent with N_c compressed tokens.
    S = N_c * cfg.compress_stride + cfg.compress_block - 1
    return max(S, T), jnp.asarray(kv_len, jnp.int32)
