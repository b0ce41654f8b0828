"""Compression phi: blocks of ``l`` keys (stride ``d``) summarised into one compressed token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import _checks, segments
from nsa_jax.config import NSAConfig

_PARAM_SHAPES = {
    "mean": lambda l, H, D, Dv: {},
    "linear": lambda l, H, D, Dv: {"w_k": (H, D, D), "w_v": (H, Dv, Dv)},
    "mlp": lambda l, H, D, Dv: {
        "pos_k": (l, D), "w1_k": (l * D, D), "b1_k": (D,), "w2_k": (D, D), "b2_k": (D,),
        "pos_v": (l, Dv), "w1_v": (l * Dv, Dv), "b1_v": (Dv,), "w2_v": (Dv, Dv), "b2_v": (Dv,),
    },
}


def param_shapes(config: NSAConfig, H: int, D: int, Dv: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the parameters ``compress`` expects for ``config.compress_method``."""
    return _PARAM_SHAPES[config.compress_method](config.compress_block, H, D, Dv)


def init_params(key, config: NSAConfig, H: int, D: int, Dv: int, dtype=jnp.float32) -> dict:
    """Initial compression parameters.

    ``linear`` starts at the identity, so training begins from mean pooling; ``mlp`` uses a
    LeCun-normal first layer, a zero second layer plus a mean-pool skip (see `compress`), so it
    too starts at mean pooling and learns a correction.
    """
    shapes = param_shapes(config, H, D, Dv)
    params = {}
    for name, shape in shapes.items():
        key, sub = jax.random.split(key)
        if name in ("w_k", "w_v"):
            params[name] = jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)
        elif name.startswith("w1"):
            params[name] = jax.random.normal(sub, shape, dtype) * shape[0] ** -0.5
        elif name.startswith("pos"):
            params[name] = jax.random.normal(sub, shape, dtype) * 0.02
        else:
            params[name] = jnp.zeros(shape, dtype)
    return params


def check_params(config: NSAConfig, params, H: int, D: int, Dv: int) -> None:
    want = param_shapes(config, H, D, Dv)
    if not want:
        if params:
            raise ValueError(f"compress_method='mean' takes no parameters, got keys {sorted(params)}")
        return
    if params is None:
        raise ValueError(f"compress_method={config.compress_method!r} needs params with shapes {want}")
    got = {name: tuple(getattr(p, "shape", ())) for name, p in params.items()}
    if got != want:
        raise ValueError(f"compress params for compress_method={config.compress_method!r} "
                         f"must have shapes {want}, got {got}")
    for name, p in params.items():
        _checks.floating(f"params[{name!r}]", p, wide=True)


def block_view(x, config: NSAConfig):
    """[B, S, H, D] -> [B, N_c, l, H, D]: the keys of each compressed token, without a gather."""
    B, S, H, D = x.shape
    l, d = config.compress_block, config.compress_stride
    N_c = config.num_compressed(S)
    r = l // d
    if N_c == 0:  # fewer than l keys: no block to slice
        return jnp.zeros((B, 0, l, H, D), x.dtype)
    chunks = x[:, : (N_c + r - 1) * d].reshape(B, N_c + r - 1, d, H, D)  # [B, N_c+r-1, d, H, D]
    return jnp.concatenate([chunks[:, j: j + N_c] for j in range(r)], axis=2)


def apply_phi(blocks, params, which: str, config: NSAConfig):
    """phi over [B, N_c, l, H, D] blocks (float32, or float64) -> [B, N_c, H, D] in their dtype."""
    mean = blocks.mean(axis=2)
    if config.compress_method == "mean":
        return mean
    hi = jax.lax.Precision.HIGHEST
    p = {name[:-2]: w.astype(blocks.dtype) for name, w in params.items() if name.endswith(which)}
    if config.compress_method == "linear":
        return jnp.einsum("bnhd,hde->bnhe", mean, p["w"], precision=hi)
    B, N_c, l, H, D = blocks.shape
    x = blocks + p["pos"][None, None, :, None, :]
    x = jnp.moveaxis(x, 2, 3).reshape(B, N_c, H, l * D)
    hidden = jax.nn.gelu(jnp.einsum("bnhi,ie->bnhe", x, p["w1"], precision=hi) + p["b1"])
    return mean + jnp.einsum("bnhe,ef->bnhf", hidden, p["w2"], precision=hi) + p["b2"]


def compress(k, v, *, config: NSAConfig, params=None, segment_ids=None, max_segments=None):
    """Compressed keys and values (docs/design.md §3, Compression).

    Args:
      k: [B, S, H, D] keys.
      v: [B, S, H, Dv] values.
      config: `NSAConfig`; ``compress_method`` chooses phi.
      params: parameters of phi (`init_params` gives their layout); None for ``"mean"``.
      segment_ids, max_segments: packed documents, as in `nsa_attention`. The compressed tokens
        are then those of the aligned layout (`segments.pack`, length T_a): document i starts at
        aligned row a_i, a multiple of d, and its compressed token j is ``k_c[:, a_i // d + j]``;
        tokens that cross a document's end are never visible to any query.

    Returns:
      k_c [B, N_c, H, D] and v_c [B, N_c, H, Dv] in ``k.dtype``, N_c = max(0, (S - l) // d + 1)
      (S = T_a with ``segment_ids``).
    """
    _checks.config(config)
    _check_kv(k, v)
    B, S, H, D = k.shape
    check_params(config, params, H, D, v.shape[3])
    _checks.packed(segment_ids, max_segments, B, S, S)
    if segment_ids is not None:
        packing = segments.pack(segment_ids, config, max_segments)
        k, v = packing.align(k), packing.align(v)
    return compress_checked(k, v, config, params)


def compress_checked(k, v, config: NSAConfig, params=None):
    """`compress` of inputs already validated (the API's composition calls this)."""
    out = []
    for x, which in ((k, "_k"), (v, "_v")):
        blocks = block_view(x.astype(_checks.accumulation(x)), config)
        out.append(apply_phi(blocks, params, which, config).astype(x.dtype))
    return tuple(out)


def _check_kv(k, v) -> None:
    _checks.rank("k", k, 4, "[B, S, H, D]")
    _checks.rank("v", v, 4, "[B, S, H, Dv]")
    _checks.floating("k", k, wide=True)
    _checks.floating("v", v, wide=True)
    _checks.same_dtype(k=k, v=v)
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on [B, S, H]: k {k.shape}, v {v.shape}")
    _checks.head_dims(k.shape[3], v.shape[3])
