"""The window branch's Mosaic GPU forward at longer windows (more KV blocks per unit), beside
cuDNN: whether its rate per FLOP is held down by what each unit pays once (its start, its end,
its two masked blocks) rather than by the blocks it walks. Writes window_walks.json under $OUT.

Usage on a Hopper GPU: python3 benchmarks/window_walks.py 65536
"""

import dataclasses
import json
import os
import sys

import jax

from nsa_jax import api
from nsa_jax.config import NSAConfig
from nsa_jax.kernels.mosaic_gpu.flash_fwd import MosaicFlashConfig
from nsa_jax.kernels.mosaic_gpu.tiling import MosaicTilings
from nsa_jax.tools import bench
from nsa_jax.tools.bench import ms_or_error

WINDOWS = (512, 1024, 2048, 4096, 8192)


def main(T: int):
    shape = bench.Shape(64, 4)
    data = bench.prepare(shape, T, config=NSAConfig(), implementation="triton")
    q, k, v = data["q"], data["k"], data["v"]
    out = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, T=T, shape=shape.name)
    dense = ms_or_error(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), q, k, v)
    out["dense"] = dict(ms=dense, tflops=round(2 * shape.HQ * T * T * shape.D / dense / 1e9, 1))
    print(out["dense"], flush=True)
    for bk in (64, 128):
        tilings = MosaicTilings(window=MosaicFlashConfig(block_k=bk, num_stages=2,
                                                         pingpong=bk == 128, prefetch_q=True))
        for w in WINDOWS:
            cfg = dataclasses.replace(NSAConfig(), window=w)
            ms = ms_or_error(lambda q, k, v: api.sliding_window_attention(
                q, k, v, config=cfg, implementation="mosaic", tilings=tilings), q, k, v)
            flops = 4 * shape.HQ * T * w * shape.D
            row = dict(ms=ms) if not isinstance(ms, float) else dict(
                ms=ms, tflops=round(flops / ms / 1e9, 1),
                share_of_cudnn=round(flops / ms / (2 * shape.HQ * T * T * shape.D / dense), 3))
            out[f"bk{bk}_w{w}"] = row
            print(bk, w, row, flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "window_walks.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(int(sys.argv[1]))
