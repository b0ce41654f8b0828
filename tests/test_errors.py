"""Bad input raises ValueError/TypeError naming the argument and its values, before any tracing."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import nsa_jax

CFG = nsa_jax.NSAConfig(window=16, num_selected=4)
q = jnp.zeros((1, 40, 4, 8))
k = jnp.zeros((1, 40, 2, 8))
v = jnp.zeros((1, 40, 2, 8))
k_c, v_c = nsa_jax.compress(k, v, config=CFG)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(compress_block=40), ValueError, "compress_block=40 must be a multiple of compress_stride=16"),
    (dict(select_block=40), ValueError, "select_block=40 must be a multiple of compress_stride=16"),
    (dict(compress_stride=0), ValueError, "compress_stride=0 must be >= 1"),
    (dict(num_selected=2), ValueError, r"forced blocks do not fit: .* = 3 > num_selected=2"),
    (dict(num_selected=1, num_local=0, num_initial=2), ValueError, "num_initial=2 must be <= num_selected=1"),
    (dict(select_q_tile=256, num_selected=4), ValueError, r"ceil\(select_q_tile=256 / select_block=64\)"),
    (dict(window=-1), ValueError, "window=-1 must be >= 0"),
    (dict(window=1.5), TypeError, "window must be an int"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(scale=-1.0), ValueError, "scale=-1.0 must be a positive"),
    (dict(compress_method="max"), ValueError, "compress_method='max' must be one of"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_config_validation(kwargs, err, match):
    with pytest.raises(err, match=match):
        nsa_jax.NSAConfig(**kwargs)


@pytest.mark.parametrize("call,err,match", [
    (lambda: nsa_jax.nsa_attention(q[0], k, v, config=CFG), ValueError, r"q must have rank 4 .* got shape \(40, 4, 8\)"),
    (lambda: nsa_jax.nsa_attention(q, k[..., None], v, config=CFG), ValueError, "k must have rank 4"),
    (lambda: nsa_jax.nsa_attention(jnp.zeros((1, 40, 3, 8)), k, v, config=CFG), ValueError,
     "query heads HQ=3 must be a multiple of KV heads H=2"),
    (lambda: nsa_jax.nsa_attention(q, jnp.zeros((1, 40, 2, 6)), v, config=CFG), ValueError,
     r"same head dim D: q \(1, 40, 4, 8\), k \(1, 40, 2, 6\)"),
    (lambda: nsa_jax.nsa_attention(q, k, jnp.zeros((1, 41, 2, 8)), config=CFG), ValueError,
     "k and v must have the same length S"),
    (lambda: nsa_jax.nsa_attention(q, k, jnp.zeros((2, 40, 2, 8)), config=CFG), ValueError, "batch sizes differ"),
    (lambda: nsa_jax.nsa_attention(q, k[:, :30], v[:, :30], config=CFG), ValueError, "causal attention needs S >= T"),
    (lambda: nsa_jax.nsa_attention(q.astype(jnp.int32), k, v, config=CFG), TypeError,
     "q.dtype=int32 must be float32, bfloat16 or float16"),
    (lambda: nsa_jax.nsa_attention(q, k.astype(jnp.bfloat16), v, config=CFG), TypeError, "inputs must share one dtype"),
    (lambda: nsa_jax.nsa_attention(q, k, v, jnp.zeros((1, 40, 4, 2)), config=CFG), ValueError,
     r"g must have shape \[B, T, HQ, 3\] = \(1, 40, 4, 3\), got \(1, 40, 4, 2\)"),
    (lambda: nsa_jax.nsa_attention(q, k, v, config=CFG, implementation="cuda"), ValueError,
     "implementation='cuda' is unknown"),
    (lambda: nsa_jax.nsa_attention(q, k, v, config=None), TypeError, "config must be an nsa_jax.NSAConfig"),
    (lambda: nsa_jax.nsa_attention(q, k, v, config=dict(window=3)), TypeError, "config must be an nsa_jax.NSAConfig"),
    (lambda: nsa_jax.nsa_attention(q, k, v, config=nsa_jax.NSAConfig(compress_method="linear")),
     ValueError, "compress_method='linear' needs params"),
    (lambda: nsa_jax.compress(k, v, config=nsa_jax.NSAConfig(compress_method="linear"),
                              params={"w_k": jnp.zeros((2, 8, 8))}), ValueError, "must have shapes"),
    (lambda: nsa_jax.compressed_attention(q, k_c, v_c[:, :, :1], config=CFG), ValueError,
     r"k_c and v_c must agree on \[B, N_c, H\]"),
    (lambda: nsa_jax.compressed_attention(q, k_c, v_c, config=CFG, kv_len=100), ValueError,
     r"kv_len=100 gives 5 compressed tokens .* k_c has N_c=1"),
    (lambda: nsa_jax.compressed_attention(q, k_c, v_c, config=CFG, kv_len=jnp.zeros((3,), jnp.int32)),
     TypeError, r"kv_len must be an int or an int32\[B=1\] array"),
    (lambda: nsa_jax.select_blocks(q, k_c, config=CFG, lse=jnp.zeros((1, 40))), ValueError,
     r"lse must have shape \[B, T, HQ\] = \(1, 40, 4\)"),
    (lambda: nsa_jax.selected_attention(q, k, v, jnp.zeros((1, 40, 4, 3), jnp.int32), config=CFG),
     ValueError, r"per-token indices must have shape \[B, T, H, n\] with \(B, T, H\) = \(1, 40, 2\)"),
    (lambda: nsa_jax.selected_attention(q, k, v, jnp.zeros((1, 40, 2, 3)), config=CFG),
     TypeError, "indices.dtype=float32 must be an integer type"),
    (lambda: nsa_jax.selected_attention(
        q, k, v, nsa_jax.BlockSparseIndices(jnp.zeros((1, 2, 3, 4), jnp.int32), jnp.zeros((1, 2, 3), jnp.int32),
                                            q_tile=1, block_size=64), config=CFG),
     ValueError, r"\(B, H, N_tiles\) = \(1, 2, 40\)"),
    (lambda: nsa_jax.gate_and_combine(q, q, q[:, :3]), ValueError, "branch outputs must share one shape"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_unavailable_implementation_raises_without_fallback():
    if jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="implementation='mosaic' needs a Hopper GPU"):
            nsa_jax.nsa_attention(q, k, v, config=CFG, implementation="mosaic")
        with pytest.raises(RuntimeError, match="implementation='triton' needs an NVIDIA GPU"):
            nsa_jax.nsa_attention(q, k, v, config=CFG, implementation="triton")


def test_errors_under_jit_are_the_same():
    """Shapes and dtypes are static, so validation fires at trace time with the same message."""
    with pytest.raises(ValueError, match="query heads HQ=3 must be a multiple of KV heads H=2"):
        jax.jit(lambda q: nsa_jax.nsa_attention(q, k, v, config=CFG))(jnp.zeros((1, 40, 3, 8)))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(num_heads=3, num_kv_heads=2), ValueError, "HQ=3 must be a multiple of KV heads H=2"),
    (dict(qkv_features=0), ValueError, "qkv_features=0 must be a positive int"),
    (dict(implementation="tpu"), ValueError, "implementation='tpu' is unknown"),
    (dict(config=None), TypeError, "config must be an nsa_jax.NSAConfig"),
])
def test_module_bad_arguments(kwargs, err, match):
    args = dict(num_heads=4, in_features=16, qkv_features=32, num_kv_heads=2, config=CFG,
                rngs=nnx.Rngs(0))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        nsa_jax.NSAAttention(**args)


def test_module_bad_input_rank():
    layer = nsa_jax.NSAAttention(4, 16, 32, num_kv_heads=2, config=CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=re.escape("inputs_q must have rank 3 ([B, T, in_features])")):
        layer(jnp.zeros((40, 16)))
