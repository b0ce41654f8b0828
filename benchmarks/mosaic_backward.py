"""The branches' backward on one GPU: for the compressed and window branches Triton's kernels
against the Mosaic GPU dQ and dK/dV kernels (each alone and both), for the selected branch
(select_q_tile=64) Triton's against the Mosaic dQ and dK/dV table walks
(`MosaicTilings.selected_dq`, `selected_dkv`); the gradients of each variant against Triton's,
and the whole layer's forward+backward with the Triton backward, the default and the default
with the selected branch's Mosaic dK/dV, beside cuDNN.
Writes mosaic_backward.json under $OUT (default: here).

Usage on a Hopper GPU: python3 benchmarks/mosaic_backward.py [--layer-only] 65536 131072
(--layer-only: cuDNN and the layer's rows, without the branches' variants)
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

from nsa_jax import api
from nsa_jax.config import NSAConfig
from nsa_jax.kernels.mosaic_gpu.flash_fwd import MosaicFlashConfig
from nsa_jax.kernels.mosaic_gpu.tiling import MosaicTilings
from nsa_jax.tools import bench
from nsa_jax.tools.bench import ms_or_error

DQ = MosaicFlashConfig(block_k=64, num_stages=2)
DKV = MosaicFlashConfig(block_k=64, num_stages=2)
DQ_PREFETCH = MosaicFlashConfig(block_k=64, num_stages=2, prefetch_q=True)
# Every backward kernel named, so that no variant depends on the defaults of MosaicTilings.
TRITON = MosaicTilings(compressed_dq=None, window_dq=None, compressed_dkv=None, window_dkv=None,
                       selected_dq=None, selected_dkv=None)
VARIANTS = {
    "triton": TRITON,
    "mosaic_dq": dataclasses.replace(TRITON, compressed_dq=DQ, window_dq=DQ),
    "mosaic_dkv": dataclasses.replace(TRITON, compressed_dkv=DKV, window_dkv=DKV),
    "mosaic_both": dataclasses.replace(TRITON, compressed_dq=DQ, window_dq=DQ,
                                       compressed_dkv=DKV, window_dkv=DKV),
    "mosaic_both_dq_prefetch": dataclasses.replace(
        TRITON, compressed_dq=DQ_PREFETCH, window_dq=DQ_PREFETCH, compressed_dkv=DKV,
        window_dkv=DKV),
}
SELECTED_VARIANTS = {
    "triton": TRITON,
    "mosaic_dq": dataclasses.replace(TRITON, selected_dq=DQ),
    "mosaic_dq_3stages": dataclasses.replace(
        TRITON, selected_dq=MosaicFlashConfig(block_k=64, num_stages=3)),
    "mosaic_dq_prefetch": dataclasses.replace(TRITON, selected_dq=DQ_PREFETCH),
    "mosaic_dkv": dataclasses.replace(TRITON, selected_dkv=DKV),
    "mosaic_both": dataclasses.replace(TRITON, selected_dq=DQ, selected_dkv=DKV),
}


def _loss(out, ct):
    return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))


def _max_rel_err(got, want):
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))
                     / jnp.max(jnp.abs(w.astype(jnp.float32)))) for g, w in zip(got, want))


def measure(shape: bench.Shape, T: int, layer_only: bool = False) -> dict:
    cfg = dataclasses.replace(NSAConfig(), select_q_tile=64)
    data = bench.prepare(shape, T, config=cfg, implementation="triton")
    q, k, v, g, k_c, v_c, sel = (data[n] for n in ("q", "k", "v", "g", "k_c", "v_c", "sel_64"))
    ct = jax.random.normal(jax.random.key(1), (1, T, shape.HQ, shape.D), q.dtype)
    out = {}

    def row(name, value):
        out[name] = value
        print(shape.name, T, name, value, flush=True)

    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation="cudnn")
    row("dense_fwd_bwd", ms_or_error(jax.grad(lambda *a: _loss(dense(*a), ct), argnums=(0, 1, 2)),
                               q, k, v))
    branches = {
        "compressed": (lambda t: lambda q, kc, vc: api.compressed_attention(
            q, kc, vc, config=cfg, implementation="mosaic", tilings=t)[0], (q, k_c, v_c),
            VARIANTS),
        "window": (lambda t: lambda q, k, v: api.sliding_window_attention(
            q, k, v, config=cfg, implementation="mosaic", tilings=t), (q, k, v), VARIANTS),
        "selected": (lambda t: lambda q, k, v: api.selected_attention(
            q, k, v, sel, config=cfg, implementation="mosaic", tilings=t), (q, k, v),
            SELECTED_VARIANTS),
    }
    for branch, (make, args, variants) in ({} if layer_only else branches).items():
        want = None
        for variant, tilings in variants.items():
            fn = make(tilings)
            _, f_vjp = jax.vjp(fn, *args)
            row(f"{branch}_bwd_{variant}", ms_or_error(lambda f_vjp, ct: f_vjp(ct), f_vjp, ct))
            try:
                grads = jax.jit(lambda f_vjp, ct: f_vjp(ct))(f_vjp, ct)
            except Exception as err:
                row(f"{branch}_bwd_{variant}_check", f"{type(err).__name__}")
                continue
            if want is None:
                want = grads
            row(f"{branch}_bwd_{variant}_check", dict(
                max_rel_err_vs_triton=_max_rel_err(grads, want),
                any_nan=any(bool(jnp.isnan(x).any()) for x in grads)))
    layer_variants = dict(triton=TRITON, mosaic_default=MosaicTilings(),
                          mosaic_selected_dkv=MosaicTilings(selected_dkv=DKV))
    for variant, tilings in layer_variants.items():
        layer = lambda q, k, v, g, t=tilings: api.nsa_attention(q, k, v, g, config=cfg,
                                                                implementation="mosaic",
                                                                tilings=t)
        grad = jax.grad(lambda *a: _loss(layer(*a), ct), argnums=(0, 1, 2, 3))
        row(f"nsa_qt64_fwd_bwd_{variant}", ms_or_error(grad, q, k, v, g))
    return out


def main(args):
    layer_only = "--layer-only" in args
    lengths = [int(a) for a in args if a != "--layer-only"]
    bench.sweep(lengths, lambda shape, T: measure(shape, T, layer_only),
                os.path.join(os.environ.get("OUT", "."), "mosaic_backward.json"))


if __name__ == "__main__":
    main(sys.argv[1:])
