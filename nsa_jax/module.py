"""`NSAAttention`: a Flax NNX layer around `nsa_attention`.

The module owns only parameters and projections (q/k/v/o, gates, compression phi); the attention
itself is the pure function `nsa_jax.nsa_attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax import _checks, segments
from nsa_jax.api import nsa_attention
from nsa_jax.compression import init_params
from nsa_jax.config import NSAConfig


def apply_rope(x, positions, base: float):
    """Rotary position embedding (rotate-half form) on [B, T, heads, D] at int [B, T] positions."""
    D = x.shape[-1]
    half = D // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [D/2]
    angle = positions[..., None, None].astype(jnp.float32) * freq  # [B, T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half: 2 * half].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([rotated, x[..., 2 * half:].astype(jnp.float32)], axis=-1).astype(x.dtype)


class NSAAttention(nnx.Module):
    """Native Sparse Attention layer with GQA, optional RoPE and learned gates.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import nsa_jax
      >>> cfg = nsa_jax.NSAConfig(window=64, num_selected=4, select_q_tile=16)
      >>> layer = nsa_jax.NSAAttention(in_features=32, num_heads=4, num_kv_heads=2, head_dim=8,
      ...                              config=cfg, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((1, 100, 32))).shape
      (1, 100, 32)

    Args:
      in_features: width of the layer input x [B, T, in_features].
      num_heads: query heads HQ.
      num_kv_heads: key/value heads H; HQ must be a multiple of H.
      head_dim: D, the query/key head dim.
      config: `NSAConfig` (its ``compress_method`` decides the compression parameters).
      v_head_dim: Dv, default ``head_dim``.
      out_features: output width, default ``in_features``.
      use_rope: rotate q and k by their positions before attention.
      rope_base: RoPE frequency base.
      implementation, tilings, interpret: passed to `nsa_attention`.
      dtype: compute dtype of projections and attention (None: the input's dtype).
      param_dtype: parameter dtype.
      rngs: `nnx.Rngs` for initialisation.
    """

    def __init__(self, in_features: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 config: NSAConfig, *, v_head_dim: int | None = None, out_features: int | None = None,
                 use_rope: bool = True, rope_base: float = 10000.0, implementation: str | None = None,
                 tilings=None, interpret: bool = False, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        _checks.options(config, implementation, interpret, tilings)
        for name, val in (("in_features", in_features), ("num_heads", num_heads),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("v_head_dim", v_head_dim), ("out_features", out_features)):
            _checks.positive_int(name, val, allow_none=name in ("v_head_dim", "out_features"))
        _checks.heads(num_heads, num_kv_heads)
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        out_features = in_features if out_features is None else out_features
        self.in_features = in_features
        self.config = config
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim
        self.use_rope, self.rope_base = use_rope, rope_base
        self.implementation, self.tilings, self.interpret = implementation, tilings, interpret
        self.dtype = dtype
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(in_features, num_heads * head_dim, **lin)
        self.k_proj = nnx.Linear(in_features, num_kv_heads * head_dim, **lin)
        self.v_proj = nnx.Linear(in_features, num_kv_heads * v_head_dim, **lin)
        self.o_proj = nnx.Linear(num_heads * v_head_dim, out_features, **lin)
        # Gates start near 1/2 each (sigmoid(0)), so all three branches train from the start.
        self.gate_proj = nnx.Linear(in_features, num_heads * 3, use_bias=True, dtype=dtype,
                                    param_dtype=param_dtype,
                                    kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        params = init_params(rngs.params(), config, num_kv_heads, head_dim, v_head_dim, param_dtype)
        self.compress_params = nnx.data({name: nnx.Param(p) for name, p in params.items()})

    def __call__(self, x, *, positions=None, segment_ids=None, max_segments: int | None = None):
        """x: [B, T, in_features] -> [B, T, out_features].

        ``positions``: int [B, T] for RoPE; default t, or the position inside each document when
        ``segment_ids`` (int [B, T], packed documents, 0 = padding) are given. ``max_segments``:
        as in `nsa_attention`.
        """
        _checks.rank("x", x, 3, "[B, T, in_features]")
        _checks.floating("x", x)
        B, T, width = x.shape
        if width != self.in_features:
            raise ValueError(f"x must have shape [B, T, in_features={self.in_features}], got "
                             f"{tuple(x.shape)}")
        _checks.packed(segment_ids, max_segments, B, T, T)
        if positions is not None and tuple(getattr(positions, "shape", ())) != (B, T):
            raise ValueError(f"positions must have shape [B, T] = {(B, T)}, got "
                             f"{getattr(positions, 'shape', type(positions).__name__)}")
        if self.dtype is not None:
            x = x.astype(self.dtype)
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.v_head_dim)
        if self.use_rope:
            if positions is None and segment_ids is not None:
                positions = segments.layout(segment_ids)[2]
            elif positions is None:
                positions = jnp.broadcast_to(jnp.arange(T), (B, T))
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, positions, self.rope_base)
        g = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32)).reshape(B, T, self.num_heads, 3)
        params = {name: p[...] for name, p in self.compress_params.items()} or None
        o = nsa_attention(q, k, v, g.astype(q.dtype), config=self.config, compress_params=params,
                          segment_ids=segment_ids, implementation=self.implementation,
                          tilings=self.tilings, interpret=self.interpret, max_segments=max_segments)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_head_dim))
