"""Block scoring with select_q_tile=64, piece by piece, on one GPU: the compressed-mass kernels
(Triton, and Mosaic GPU at several tilings), the XLA selection that follows them, the top-n
kernel `tile_top_blocks` on the same block scores, and `select_blocks` whole per backend, beside
the compressed forward and cuDNN. Writes scoring_parts_<T>.json under $OUT (default: here).

Usage on a Hopper GPU: python3 benchmarks/scoring_parts.py 65536 131072
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

from nsa_jax import api
from nsa_jax.config import NSAConfig
from nsa_jax.kernels.mosaic_gpu import block_scores as mosaic_scores
from nsa_jax.kernels.triton import block_scores as triton_scores
from nsa_jax.kernels.triton.tiling import SM90
from nsa_jax.kernels.triton.top_blocks import tile_top_blocks
from nsa_jax.ops import selection
from nsa_jax.ops import triton as tri
from nsa_jax.tools import bench
from nsa_jax.tools.bench import ms_or_error

MOSAIC_TILINGS = (mosaic_scores.MosaicScoringConfig(),
                  mosaic_scores.MosaicScoringConfig(num_stages=2),
                  mosaic_scores.MosaicScoringConfig(rows=128))


def measure(shape: bench.Shape, T: int) -> dict:
    cfg = dataclasses.replace(NSAConfig(), select_q_tile=64)
    data = bench.prepare(shape, T, config=cfg, implementation="triton")
    q, k, v, k_c, v_c, lse = (data[n] for n in ("q", "k", "v", "k_c", "v_c", "lse"))
    D, qt = q.shape[-1], cfg.select_q_tile
    N_s = -(-T // cfg.select_block)
    offsets = tri.key_offsets(1, T, T)
    args = dict(rule=tri.compressed_rule(cfg, k_c.shape[1]), scale=cfg.softmax_scale(D),
                q_tile=qt)
    out = {}

    def row(name, fn, *a):
        out[name] = ms_or_error(fn, *a)
        print(shape.name, T, name, out[name], flush=True)

    row("dense", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                              implementation="cudnn"), q, k, v)
    for impl in ("triton", "mosaic"):
        row(f"compressed_{impl}", lambda q, kc, vc: api.compressed_attention(
            q, kc, vc, config=cfg, implementation=impl)[0], q, k_c, v_c)
    tiling = SM90.scoring.flash(shape.HQ // shape.H, q_tile=qt)
    triton_mass = lambda q, kc, lse: triton_scores.compressed_mass(q, kc, lse, offsets,
                                                                  config=tiling, **args)
    row("mass_triton", triton_mass, q, k_c, lse)
    want = jax.jit(triton_mass)(q, k_c, lse)
    for tc in MOSAIC_TILINGS:
        name = f"mass_mosaic_rows{tc.rows}_stages{tc.num_stages}"
        mosaic_mass = lambda q, kc, lse: mosaic_scores.compressed_mass(q, kc, lse, offsets,
                                                                      config=tc, **args)
        row(name, mosaic_mass, q, k_c, lse)
        if isinstance(out[name], float):
            got, again = (jax.jit(mosaic_mass)(q, k_c, lse) for _ in range(2))
            out[name + "_check"] = dict(
                max_err_vs_triton=float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))),
                bit_identical_rerun=bool(jnp.all(got == again)),
                any_nan=bool(jnp.isnan(got).any()))
    scores = jax.jit(lambda m: selection.block_scores(m, cfg, N_s))(want)
    row("block_scores_xla", lambda m: selection.block_scores(m, cfg, N_s), want)
    first, last = selection.tile_span(jnp.arange(-(-T // qt), dtype=jnp.int32) * qt, qt, T,
                                      offsets)
    n_kv = selection.kv_blocks(1, T, cfg)
    choose = lambda s: selection.choose_blocks(s, first, last, cfg, n_kv)
    top = lambda s: tile_top_blocks(s, first, last, n_kv.reshape(1), rule=tri._block_rule(cfg))
    row("choose_blocks_xla", choose, scores)
    row("tile_top_blocks", top, scores)
    a, b = jax.jit(choose)(scores), jax.jit(top)(scores)
    out["tile_top_same_as_xla"] = dict(ids=bool(jnp.all(a[0] == b[0])),
                                       counts=bool(jnp.all(a[1] == b[1])))
    for impl in ("triton", "mosaic"):
        row(f"select_blocks_{impl}", lambda q, kc, lse: api.select_blocks(
            q, kc, config=cfg, lse=lse, implementation=impl), q, k_c, lse)
    return out


def main(lengths):
    bench.sweep(lengths, measure, os.path.join(os.environ.get("OUT", "."), "scoring_parts.json"))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
