"""The "triton" implementation: the three branches on the Pallas flash core (Triton lowering).

Forward runs the kernels. Until the backward kernels land, gradients are the "xla" path's
gradients of the same function (the same semantics, computed tile by tile in XLA).
Selection scores are computed tile by tile in XLA (`xla.select_blocks`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import metadata, xla
from nsa_jax.config import NSAConfig
from nsa_jax.kernels.flash_fwd import FlashConfig, MaskRule, flash_forward

ROWS = 64  # query rows (queries x group heads) per program


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_available(interpret: bool) -> None:
    if not interpret and jax.default_backend() != "gpu":
        raise RuntimeError(
            f"implementation='triton' needs an NVIDIA GPU (JAX backend is "
            f"{jax.default_backend()!r}); pass interpret=True to run the kernels in interpret mode")


def _range_config(G: int) -> FlashConfig:
    return FlashConfig(block_q=max(1, ROWS // _pow2(G)), block_k=64)


def _offsets(B: int, T: int, S: int, kv_len=None):
    if kv_len is None:
        return jnp.full((B,), S - T, jnp.int32)
    return (kv_len - T).astype(jnp.int32)


def _zero_cotangent(x):
    return np.zeros(x.shape, jax.dtypes.float0)


def _with_xla_gradient(kernel_fn, xla_fn, num_diff: int):
    """``kernel_fn(*diff_args, *int_args)`` forward, ``xla_fn``'s VJP backward."""

    @jax.custom_vjp
    def f(*args):
        return kernel_fn(*args)

    def fwd(*args):
        return kernel_fn(*args), args

    def bwd(args, ct):
        diff, rest = args[:num_diff], args[num_diff:]
        _, vjp = jax.vjp(lambda *d: xla_fn(*d, *rest), *diff)
        return (*vjp(ct), *(_zero_cotangent(x) for x in rest))

    f.defvjp(fwd, bwd)
    return f


def compressed_attention(q, k_c, v_c, cfg: NSAConfig, S: int, kv_len=None, interpret=False):
    B, T, HQ, D = q.shape
    H = k_c.shape[2]
    rule = MaskRule(num_keys=k_c.shape[1], key_stride=cfg.compress_stride,
                    key_offset=cfg.compress_block - 1, causal=cfg.causal)
    if not cfg.causal and kv_len is not None:
        raise NotImplementedError("implementation='triton': non-causal compressed attention with "
                                  "per-row kv_len is not supported yet")
    tiling = _range_config(HQ // H)
    scale = cfg.softmax_scale(D)

    def kernel(q, k_c, v_c, offsets):
        o, lse = flash_forward(q, k_c, v_c, offsets, rule=rule, scale=scale, config=tiling,
                               interpret=interpret)
        return o, lse

    def ref(q, k_c, v_c, offsets):
        return xla.compressed_attention(q, k_c, v_c, cfg, S, kv_len)

    return _with_xla_gradient(kernel, ref, 3)(q, k_c, v_c, _offsets(B, T, S, kv_len))


def _selected_tiling(sel: metadata.BlockSparseIndices, G: int) -> FlashConfig:
    bk = sel.block_size & -sel.block_size  # largest power of two dividing the block size
    bk = min(bk, 64)
    if bk < 16:
        raise NotImplementedError(
            f"implementation='triton' needs select_block divisible by 16, got {sel.block_size}")
    bq = 1
    while bq * 2 <= sel.q_tile and sel.q_tile % (bq * 2) == 0 and bq * 2 * _pow2(G) <= ROWS:
        bq *= 2
    return FlashConfig(block_q=bq, block_k=bk)


def selected_attention(q, k, v, sel: metadata.BlockSparseIndices, cfg: NSAConfig, interpret=False):
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    tiling = _selected_tiling(sel, HQ // H)
    blocks = metadata.reblock(sel, tiling.block_k, -(-S // tiling.block_k))
    rule = MaskRule(num_keys=S, causal=cfg.causal)
    scale = cfg.softmax_scale(D)

    def kernel(q, k, v, indices, counts):
        o, _ = flash_forward(q, k, v, _offsets(B, T, S), rule=rule, scale=scale, config=tiling,
                             table=indices, counts=counts, table_q_tile=sel.q_tile,
                             interpret=interpret)
        return o

    def ref(q, k, v, indices, counts):
        return xla.selected_attention(q, k, v, metadata.BlockSparseIndices(
            indices, counts, q_tile=blocks.q_tile, block_size=blocks.block_size), cfg)

    return _with_xla_gradient(kernel, ref, 3)(q, k, v, blocks.indices, blocks.counts)


def sliding_window_attention(q, k, v, cfg: NSAConfig, interpret=False):
    B, T, HQ, D = q.shape
    S, H = k.shape[1], k.shape[2]
    rule = MaskRule(num_keys=S, causal=cfg.causal, window=cfg.window)
    tiling = _range_config(HQ // H)
    scale = cfg.softmax_scale(D)

    def kernel(q, k, v, offsets):
        o, _ = flash_forward(q, k, v, offsets, rule=rule, scale=scale, config=tiling,
                             interpret=interpret)
        return o

    def ref(q, k, v, offsets):
        return xla.sliding_window_attention(q, k, v, cfg)

    return _with_xla_gradient(kernel, ref, 3)(q, k, v, _offsets(B, T, S))
