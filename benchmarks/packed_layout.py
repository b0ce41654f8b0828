"""What the aligned layout of packed documents costs: the "triton" branches at length T (bf16,
HQ=64, H=4, D=128, documents of 1k..16k tokens as in `nsa-jax bench --packed-lengths`), with
``max_segments`` = the number of documents and with the default, against the same row unpacked.

    python benchmarks/packed_layout.py 16384    # needs a GPU
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import nsa_jax
from nsa_jax import api, segments
from nsa_jax.ops import triton as pallas_triton
from nsa_jax.tools import bench


def timeit(name, f, *args, reps=3):
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(f(*args))
    print(f"{name:40s} {(time.perf_counter() - t0) / reps * 1e3:9.2f} ms", flush=True)


def main(T: int) -> None:
    HQ, H, D = 64, 4, 128
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, T, HQ, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (1, T, H, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (1, T, H, D), jnp.bfloat16)
    docs = bench.document_lengths(T, 1024, 16384, seed=T)
    seg = jnp.asarray(np.repeat(np.arange(1, len(docs) + 1), docs)[None], jnp.int32)
    print(f"T={T}, {len(docs)} documents {docs}, {jax.devices()[0].device_kind}")
    for qt in (64, 1):
        cfg = nsa_jax.NSAConfig(select_q_tile=qt)
        for M in (len(docs), None):
            pk = segments.pack(seg, cfg, M)
            q_a, k_a, v_a = (pk.align(x) for x in (q, k, v))
            T_a = q_a.shape[1]
            bounds = pk.key_bounds
            c_bounds = bounds.compressed(cfg)
            k_c, v_c = nsa_jax.compress(k_a, v_a, config=cfg)
            tag = f"qt{qt} M={M} T_a={T_a}"
            timeit(f"{tag} compressed", lambda q, kc, vc: pallas_triton.compressed_attention(
                q, kc, vc, cfg, T_a, None, bounds=c_bounds)[0], q_a, k_c, v_c)
            _, lse = pallas_triton.compressed_attention(q_a, k_c, v_c, cfg, T_a, None, bounds=c_bounds)
            timeit(f"{tag} select", lambda q, kc, lse: pallas_triton.select_blocks(
                q, kc, cfg, T_a, None, lse, bounds=bounds).indices, q_a, k_c, lse)
            sel = pallas_triton.select_blocks(q_a, k_c, cfg, T_a, None, lse, bounds=bounds)
            timeit(f"{tag} selected", lambda q, k, v: pallas_triton.selected_attention(
                q, k, v, sel, cfg), q_a, k_a, v_a)
            timeit(f"{tag} window", lambda q, k, v: pallas_triton.sliding_window_attention(
                q, k, v, cfg, bounds=bounds), q_a, k_a, v_a)
            timeit(f"{tag} whole", lambda q, k, v: api.nsa_attention(
                q, k, v, config=cfg, segment_ids=seg, max_segments=M), q, k, v)
        timeit(f"qt{qt} unpacked whole", lambda q, k, v: api.nsa_attention(q, k, v, config=cfg),
               q, k, v)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)
