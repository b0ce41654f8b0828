"""The decode step (B=32, HQ=64, H=4, one token) at several tilings of its Triton kernels (the
scored compressed forward, the window, the per-token selected branch) and share counts, beside
dense cuDNN decode; each variant's first step checked against the default's. Writes
decode_tilings.json under $OUT (default: here).

Usage on a Hopper GPU: python3 benchmarks/decode_tilings.py 65536 131072
"""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp

from nsa_jax.config import NSAConfig
from nsa_jax.decode import nsa_decode
from nsa_jax.kernels.mosaic_gpu.tiling import MosaicTilings
from nsa_jax.kernels.triton.tiling import SM90, Tiling
from nsa_jax.ops import triton as tri
from nsa_jax.tools import decode_bench

B, HQ, H, D = 32, 64, 4, 128
# (name, {TritonTilings field: Tiling}, programs the compressed shares aim at); the first is the
# default. `scored` is the step's largest kernel, the window and selected ones follow it.
tile = lambda rows=128, bk=64, warps=4, stages=2: Tiling(rows=rows, block_k=bk, num_warps=warps,
                                                         num_stages=stages)
VARIANTS = (
    ("default", {}, 256),
    ("scored_s2", dict(scored=tile(stages=2)), 256),
    ("scored_s3", dict(scored=tile(stages=3)), 256),
    ("scored_s5", dict(scored=tile(stages=5)), 256),
    ("scored_s6", dict(scored=tile(stages=6)), 256),
    ("scored_bk128_s4", dict(scored=tile(bk=128, stages=4)), 256),
    ("shares512", {}, 512),
    ("window_s3", dict(window=tile(stages=3)), 256),
    ("window_s4", dict(window=tile(stages=4)), 256),
    ("per_token_s3", dict(selected_per_token=tile(rows=16, stages=3)), 256),
    ("per_token_s4", dict(selected_per_token=tile(rows=16, stages=4)), 256),
)


def tilings(fields):
    return MosaicTilings(triton=dataclasses.replace(SM90, **fields))


def first_step(S, t, cfg):
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (B, 1, HQ, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, 1, H, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, 1, H, D), jnp.bfloat16)
    cache = decode_bench._filled_cache(B, S, S + 1024, H, D, cfg, jnp.bfloat16)
    return jax.jit(lambda q, k, v, c: nsa_decode(q, k, v, None, c, config=cfg,
                                                 tilings=t)[0])(q, k, v, cache)


def measure(S, variants, cfg):
    rows = {}
    want = None
    for name, fields, programs in variants:
        tri.SHARE_PROGRAMS["compressed"] = programs
        t = tilings(fields)
        try:
            row = decode_bench.measure(S, B, HQ, H, D, config=cfg, implementation=None, reps=5,
                                       tilings=t, dense=not rows)
            o = first_step(S, t, cfg).astype(jnp.float32)
            want = o if want is None else want
            row["max_abs_diff_vs_default"] = float(jnp.max(jnp.abs(o - want)))
            row["any_nan"] = bool(jnp.isnan(o).any())
        except Exception as err:
            row = dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
        rows[name] = row
        print(S, name, {k: v for k, v in row.items() if "ms" in k or "diff" in k or "error" in k},
              flush=True)
    tri.SHARE_PROGRAMS["compressed"] = VARIANTS[0][2]
    return rows


def main(lengths):
    cfg = NSAConfig()
    out = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, results={})
    path = os.path.join(os.environ.get("OUT", "."), "decode_tilings.json")
    variants = VARIANTS
    for S in lengths:
        out["results"][S] = measure(S, variants, cfg)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        timed = [(r["nsa_ms"], v) for v, r in zip(variants, out["results"][S].values())
                 if "nsa_ms" in r]
        # Longer contexts time the default and the two fastest of the first.
        variants = (VARIANTS[0], *[v for _, v in sorted(timed)[:3] if v != VARIANTS[0]][:2])


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
