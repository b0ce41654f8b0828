"""The forward branches (compressed, window, and selected with select_q_tile=64) on one GPU at
several Mosaic GPU tilings (block size, ring stages, ping-pong, `prefetch_q`), beside Triton's
forward and cuDNN, each output checked against Triton's. Writes mosaic_forward_tilings.json
under $OUT (default: here).

Usage on a Hopper GPU: python3 benchmarks/mosaic_forward_tilings.py 65536 131072
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

# (block_k, num_stages, pingpong, prefetch_q); the first of each list is the shipped default.
# 128-key blocks with prefetch send the output through the Q buffers (`MosaicFlashConfig`).
COMPRESSED = ((128, 2, True, False), (128, 2, True, True), (64, 3, True, True))
WINDOW = ((64, 2, False, True), (64, 3, False, True), (128, 2, False, True), (128, 2, True, True))
SELECTED = ((64, 2, True, True), (64, 3, True, True))


def measure(shape: bench.Shape, T: int) -> dict:
    cfg = dataclasses.replace(NSAConfig(), select_q_tile=64)
    data = bench.prepare(shape, T, config=cfg, implementation="triton")
    q, k, v, k_c, v_c, sel = (data[n] for n in ("q", "k", "v", "k_c", "v_c", "sel_64"))
    flops = dict(selected=4 * shape.HQ * T * cfg.num_selected * cfg.select_block * shape.D,
                 window=4 * shape.HQ * T * cfg.window * shape.D,
                 compressed=2 * shape.HQ * T * k_c.shape[1] * shape.D)
    inputs = dict(compressed=(q, k_c, v_c), window=(q, k, v), selected=(q, k, v))
    out = {}

    def row(name, value):
        out[name] = value
        print(shape.name, T, name, value, flush=True)

    row("dense", ms_or_error(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), q, k, v))
    make = dict(
        compressed=lambda impl, t: lambda q, kc, vc: api.compressed_attention(
            q, kc, vc, config=cfg, implementation=impl, tilings=t)[0],
        window=lambda impl, t: lambda q, k, v: api.sliding_window_attention(
            q, k, v, config=cfg, implementation=impl, tilings=t),
        selected=lambda impl, t: lambda q, k, v: api.selected_attention(
            q, k, v, sel, config=cfg, implementation=impl, tilings=t))
    for branch, variants in (("compressed", COMPRESSED), ("window", WINDOW),
                             ("selected", SELECTED)):
        args = inputs[branch]
        want = jax.jit(make[branch]("triton", None))(*args)
        ms = ms_or_error(make[branch]("triton", None), *args)
        row(f"{branch}_triton", dict(ms=ms, tflops=round(flops[branch] / ms / 1e9, 1)))
        for bk, stages, pingpong, prefetch in variants:
            c = MosaicFlashConfig(block_k=bk, num_stages=stages, pingpong=pingpong,
                                  prefetch_q=prefetch)
            tilings = MosaicTilings(**{branch: c})
            fn = make[branch]("mosaic", tilings)
            name = f"{branch}_mosaic_bk{bk}_st{stages}_pp{int(pingpong)}_pf{int(prefetch)}"
            ms = ms_or_error(fn, *args)
            if not isinstance(ms, float):
                row(name, ms)
                continue
            got = jax.jit(fn)(*args)
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            row(name, dict(ms=ms, tflops=round(flops[branch] / ms / 1e9, 1),
                           max_abs_diff_vs_triton=err, any_nan=bool(jnp.isnan(got).any())))
    return out


def main(lengths):
    bench.sweep(lengths, measure,
                os.path.join(os.environ.get("OUT", "."), "mosaic_forward_tilings.json"))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
