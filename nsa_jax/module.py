"""`NSAAttention`: a Flax NNX layer around `nsa_attention`.

The module owns only parameters and projections (q/k/v/o, gates, compression phi); the attention
itself is the pure function `nsa_jax.nsa_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax import _checks, segments
from nsa_jax.api import nsa_attention
from nsa_jax.compression import init_params
from nsa_jax.config import NSAConfig
from nsa_jax.decode import NSACache, init_cache, nsa_decode
from nsa_jax.parallel import MeshAxes


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
    """Native Sparse Attention as a causal self-attention layer: GQA, optional RoPE, learned gates.

    Shaped like `flax.nnx.MultiHeadAttention` where the two coincide: the same leading arguments
    in the same order (``num_heads, in_features, qkv_features, out_features, num_kv_heads``),
    ``head_dim = qkv_features // num_heads``, the projections ``query``, ``key``, ``value`` and
    ``out`` as `nnx.LinearGeneral` with ``use_bias``, ``kernel_init``, ``bias_init``,
    ``out_kernel_init``, ``out_bias_init`` (so `nnx.with_partitioning` works), ``precision``,
    ``dtype`` and ``param_dtype``, and ``input_positions`` at call time. Where NSA differs:
    self-attention only (one input), causal or not by ``config.causal``, no mask or dropout
    arguments, a value width ``v_head_dim`` that may differ from ``head_dim``, a ``gate``
    projection (three sigmoid gates per head, starting at 1/2), the compression parameters of
    ``config.compress_method``, and ``sow_selection`` to record the blocks it selected.

    Generation works as in `nnx.MultiHeadAttention`: ``init_cache((B, max_length, in_features))``
    creates the cache (`nsa_jax.NSACache` in an `nnx.Cache` variable), then ``layer(x,
    decode=True)`` appends x's tokens (a prompt, a chunk of one, or one new token) at each row's
    cached length, at positions continuing from there, and returns their outputs; rows may hold
    different lengths.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import nsa_jax
      >>> cfg = nsa_jax.NSAConfig(window=64, num_selected=4, select_q_tile=16)
      >>> layer = nsa_jax.NSAAttention(4, 32, num_kv_heads=2, config=cfg, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((1, 100, 32))).shape
      (1, 100, 32)

    Args:
      num_heads: query heads HQ.
      in_features: width of the layer input [B, T, in_features].
      qkv_features: HQ * D, the width of the query projection (default ``in_features``); D =
        qkv_features // num_heads.
      out_features: output width (default ``in_features``).
      num_kv_heads: key/value heads H (default ``num_heads``); HQ must be a multiple of H.
      config: `NSAConfig`.
      v_head_dim: Dv, default D.
      dtype, param_dtype, precision, kernel_init, bias_init, use_bias, out_kernel_init,
        out_bias_init: as in `nnx.MultiHeadAttention`, for the q/k/v/out projections (the out
        ones default to kernel_init / bias_init). The gate projection always has a bias and
        starts at zero.
      use_rope, rope_base: rotate q and k by their positions before attention, with this base.
      implementation, tilings, interpret, mesh_axes: passed to `nsa_attention`. Under
        explicit mesh axes the projections' shardings (from ``kernel_init`` partitioning or the
        input's) decide the parallelism; ``mesh_axes`` names it under auto axes, or gives the
        zig-zag layout (then pass ``input_positions`` in that order, e.g. `nsa_jax.zigzag`).
      decode: default of ``__call__``'s ``decode``.
      rngs: `nnx.Rngs` for initialisation.
    """

    def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
                 out_features: int | None = None, num_kv_heads: int | None = None, *,
                 config: NSAConfig, v_head_dim: int | None = None, dtype=None,
                 param_dtype=jnp.float32, precision=None,
                 kernel_init=nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                 out_kernel_init=None, bias_init=nnx.initializers.zeros_init(),
                 out_bias_init=None, use_bias: bool = True, use_rope: bool = True,
                 rope_base: float = 10000.0, implementation: str | None = None, tilings=None,
                 interpret: bool = False, decode: bool = False,
                 mesh_axes: MeshAxes | None = None, rngs: nnx.Rngs):
        _checks.options(config, implementation, interpret, tilings)
        for name, val in (("num_heads", num_heads), ("in_features", in_features),
                          ("qkv_features", qkv_features), ("out_features", out_features),
                          ("num_kv_heads", num_kv_heads), ("v_head_dim", v_head_dim)):
            _checks.positive_int(name, val, allow_none=name not in ("num_heads", "in_features"))
        qkv_features = in_features if qkv_features is None else qkv_features
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _checks.heads(num_heads, num_kv_heads)
        if qkv_features % num_heads:
            raise ValueError(f"qkv_features={qkv_features} must be a multiple of "
                             f"num_heads={num_heads} (head_dim = qkv_features // num_heads)")
        head_dim = qkv_features // num_heads
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.num_heads, self.in_features = num_heads, in_features
        self.qkv_features = qkv_features
        self.out_features = in_features if out_features is None else out_features
        self.num_kv_heads = num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim
        self.config = config
        self.use_rope, self.rope_base = use_rope, rope_base
        self.implementation, self.tilings, self.interpret = implementation, tilings, interpret
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        if not isinstance(decode, bool):
            raise TypeError(f"decode must be a bool, got {decode!r}")
        self.decode = decode
        if mesh_axes is not None and not isinstance(mesh_axes, MeshAxes):
            raise TypeError(f"mesh_axes must be an nsa_jax.MeshAxes or None, got {mesh_axes!r}")
        self.mesh_axes = mesh_axes
        self.cache: nnx.Cache | None = nnx.data(None)
        linear = functools.partial(nnx.LinearGeneral, dtype=dtype, param_dtype=param_dtype,
                                   precision=precision, use_bias=use_bias, rngs=rngs)
        proj = functools.partial(linear, in_features, kernel_init=kernel_init,
                                 bias_init=bias_init)
        self.query = proj((num_heads, head_dim))
        self.key = proj((num_kv_heads, head_dim))
        self.value = proj((num_kv_heads, v_head_dim))
        self.out = linear((num_heads, v_head_dim), self.out_features, axis=(-2, -1),
                          kernel_init=out_kernel_init or kernel_init,
                          bias_init=out_bias_init or bias_init)
        # Gates start at sigmoid(0) = 1/2 each, so all three branches train from the start.
        self.gate = nnx.LinearGeneral(in_features, (num_heads, 3), use_bias=True, dtype=dtype,
                                      param_dtype=param_dtype, precision=precision,
                                      kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        params = init_params(rngs.params(), config, num_kv_heads, head_dim, v_head_dim, param_dtype)
        self.compress_params = nnx.data({name: nnx.Param(p) for name, p in params.items()})

    def init_cache(self, input_shape, dtype=None):
        """An empty cache for ``input_shape = (B, max_length, in_features)`` inputs, held in
        ``self.cache`` (an `nnx.Cache` of `nsa_jax.NSACache`), in ``dtype``: by default the
        layer's ``dtype``, float32 without one (the dtype of its q, k and v)."""
        if dtype is None:
            dtype = jnp.float32 if self.dtype is None else self.dtype
        shape = tuple(input_shape)
        if len(shape) != 3 or shape[2] != self.in_features:
            raise ValueError(f"input_shape must be (B, max_length, in_features="
                             f"{self.in_features}), got {shape}")
        self.cache = nnx.Cache(init_cache(shape[0], shape[1], self.num_kv_heads, self.head_dim,
                                          self.v_head_dim, config=self.config, dtype=dtype))

    def project(self, inputs_q, *, input_positions=None, segment_ids=None, qkv_sharding=None):
        """The attention inputs of ``inputs_q`` [B, T, in_features]: q [B, T, HQ, D], k [B, T, H,
        D] and v [B, T, H, Dv] (q and k rotated when ``use_rope``) and the gates g [B, T, HQ, 3]
        in (0, 1); what ``__call__`` hands to `nsa_attention`. ``qkv_sharding``: the
        projections' ``out_sharding`` (explicit mesh axes), for all four."""
        x = self._check_input(inputs_q, input_positions, segment_ids)
        B, T, _ = x.shape
        q, k, v = (self.query(x, out_sharding=qkv_sharding),
                   self.key(x, out_sharding=qkv_sharding),
                   self.value(x, out_sharding=qkv_sharding))
        if self.use_rope:
            positions = input_positions
            if positions is None and segment_ids is not None:
                positions = segments.layout(segment_ids)[2]
            elif positions is None:
                positions = jnp.broadcast_to(jnp.arange(T), (B, T))
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, positions, self.rope_base)
        g = jax.nn.sigmoid(self.gate(x, out_sharding=qkv_sharding).astype(jnp.float32))
        g = g.astype(q.dtype)
        return q, k, v, g

    def __call__(self, inputs_q, *, input_positions=None, segment_ids=None,
                 max_segments: int | None = None, sow_selection: bool = False,
                 decode: bool | None = None, num_new=None, out_sharding=None,
                 qkv_sharding=None):
        """inputs_q: [B, T, in_features] -> [B, T, out_features].

        ``input_positions``: int [B, T] for RoPE (unused without it); default t, or the position
        inside each document when ``segment_ids`` (int [B, T], packed documents, 0 = padding) are
        given.
        ``max_segments``: as in `nsa_attention`. ``sow_selection``: record the selection the
        layer made (`BlockSparseIndices`) with ``self.sow(nnx.Intermediate, "selection", ...)``
        (not with ``segment_ids``); e.g. ``y, sown = nnx.capture(layer, nnx.Intermediate)(x,
        sow_selection=True)``, then ``(sel,) = sown["selection"].get_value()``.
        ``decode``: append to the cache of `init_cache` and attend over it (default
        ``self.decode``); ``input_positions`` then default to each row's cached length + t.
        ``num_new``: with ``decode``, int32[B] tokens of the T that each row really appends
        (`nsa_jax.nsa_decode`).
        ``out_sharding``, ``qkv_sharding``: as in `nnx.MultiHeadAttention`, the ``out_sharding``
        of the output projection and of the q/k/v (and gate) projections, for explicit mesh
        axes (e.g. the input's sharding when the out kernel is split over heads).
        """
        decode = self.decode if decode is None else decode
        if decode:
            if max_segments is not None:
                raise ValueError("decode=True takes no max_segments (no packed documents)")
            return self._decode(inputs_q, input_positions, segment_ids, sow_selection, num_new)
        if num_new is not None:
            raise ValueError("num_new is only used with decode=True")
        zigzag = self.mesh_axes is not None and self.mesh_axes.layout == "zigzag"
        if zigzag and self.use_rope and input_positions is None:
            raise ValueError("with MeshAxes(layout='zigzag') the tokens are in zig-zag order: "
                             "pass input_positions in the same order (nsa_jax.zigzag)")
        q, k, v, g = self.project(inputs_q, input_positions=input_positions,
                                  segment_ids=segment_ids, qkv_sharding=qkv_sharding)
        o = nsa_attention(q, k, v, g, config=self.config,
                          compress_params=self.compress_param_values(),
                          segment_ids=segment_ids, implementation=self.implementation,
                          tilings=self.tilings, interpret=self.interpret,
                          max_segments=max_segments, return_selection=sow_selection,
                          mesh_axes=self.mesh_axes)
        if sow_selection:
            o, sel = o
            self.sow(nnx.Intermediate, "selection", sel)
        return self.out(o, out_sharding=out_sharding)

    def _decode(self, inputs_q, input_positions, segment_ids, sow_selection, num_new):
        if self.cache is None:
            raise ValueError("decode=True needs a cache: call layer.init_cache((B, max_length, "
                             "in_features)) first")
        if segment_ids is not None or sow_selection:
            raise ValueError("decode=True takes neither segment_ids nor sow_selection")
        cache: NSACache = self.cache.get_value()
        _checks.rank("inputs_q", inputs_q, 3, "[B, T, in_features]")
        B, T = inputs_q.shape[:2]
        if B != cache.lengths.shape[0]:
            raise ValueError(f"inputs_q has B={B} rows; the cache holds "
                             f"{cache.lengths.shape[0]}")
        if input_positions is None:
            input_positions = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)
        q, k, v, g = self.project(inputs_q, input_positions=input_positions)
        # Decoding splits rows and heads, never the sequence.
        axes = self.mesh_axes and MeshAxes(batch=self.mesh_axes.batch,
                                           heads=self.mesh_axes.heads)
        o, cache = nsa_decode(
            q, k, v, g, cache, config=self.config, compress_params=self.compress_param_values(),
            num_new=num_new, implementation=self.implementation, tilings=self.tilings,
            interpret=self.interpret, mesh_axes=axes)
        self.cache.set_value(cache)
        return self.out(o)

    def compress_param_values(self):
        """The compression parameters as arrays (for `nsa_jax.compress`), None for "mean"."""
        return {name: p[...] for name, p in self.compress_params.items()} or None

    def _check_input(self, x, positions, segment_ids):
        _checks.rank("inputs_q", x, 3, "[B, T, in_features]")
        _checks.floating("inputs_q", x)
        B, T, width = x.shape
        if width != self.in_features:
            raise ValueError(f"inputs_q must have shape [B, T, in_features={self.in_features}], "
                             f"got {tuple(x.shape)}")
        if positions is not None and tuple(getattr(positions, "shape", ())) != (B, T):
            raise ValueError(f"input_positions must have shape [B, T] = {(B, T)}, got "
                             f"{getattr(positions, 'shape', type(positions).__name__)}")
        if segment_ids is not None:
            _checks.packed(segment_ids, None, B, T, T)
        return x if self.dtype is None else x.astype(self.dtype)
