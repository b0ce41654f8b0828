"""Compressed tokens onto selection blocks on the matrix units (Triton lowering).

Block scoring maps each compressed token's probability linearly onto the selection blocks its
strides fall in (docs/design.md §3). On a chunk of whole blocks that map is a fixed banded
matrix, and the product with float32 probabilities keeps float32 accuracy when they go in as
three bfloat16 parts.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton


def token_map(BK: int, per_block: int, overlap: int):
    """(bfloat16 [BK, NB], float32 [BK]): the share of each token of a block-aligned chunk in each
    of the chunk's blocks, and the share past the chunk's end (in the next chunk's first block)."""
    pb, r = per_block, overlap
    i = lax.broadcasted_iota(jnp.int32, (BK, BK // pb), 0)
    j = lax.broadcasted_iota(jnp.int32, (BK, BK // pb), 1)
    # Token i covers strides i .. i + r - 1; block j holds strides j * pb .. (j + 1) * pb - 1.
    inside = jnp.minimum(i + r, (j + 1) * pb) - jnp.maximum(i, j * pb)
    share = jnp.maximum(inside, 0).astype(jnp.float32) / r
    t = lax.broadcasted_iota(jnp.int32, (BK,), 0)
    tail = jnp.maximum(t + r - BK, 0).astype(jnp.float32) / r
    return share.astype(jnp.bfloat16), tail


def bf16_head(x):
    """The leading bfloat16 part of float32 x, by truncating the mantissa: exactly representable,
    so no compiler may fold the split away (XLA drops f32 -> bf16 -> f32 round trips)."""
    bits = lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-65536)
    return lax.bitcast_convert_type(bits, jnp.float32)


def exact_dot(p, m):
    """float32 p [M, K] @ m [K, N] (bfloat16, exactly representable) at float32 accuracy."""
    hi = bf16_head(p)
    rest = p - hi
    mid = bf16_head(rest)
    lo = rest - mid
    # Smallest parts first.
    out = pltriton.dot(lo.astype(jnp.bfloat16), m) + pltriton.dot(mid.astype(jnp.bfloat16), m)
    return out + pltriton.dot(hi.astype(jnp.bfloat16), m)
