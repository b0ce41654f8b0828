"""Quick forward timing of the "triton" and "xla" paths against dense cuDNN attention (one GPU).

python3 benchmarks/quick_forward.py [T ...]
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import nsa_jax

B, HQ, H, D = 1, 64, 4, 128


def bench(fn, *args, reps: int = 5) -> float:
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    del out
    return float(np.median(times)) * 1e3


def main(lengths):
    print(jax.devices()[0].device_kind, jax.__version__)
    for T in lengths:
        ks = jax.random.split(jax.random.key(T), 4)
        q = jax.random.normal(ks[0], (B, T, HQ, D), jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, T, H, D), jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, T, H, D), jnp.bfloat16)
        g = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, HQ, 3))).astype(jnp.bfloat16)
        dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"))
        t_dense = bench(dense, q, k, v)
        dense_tf = 2 * HQ * T * T * D / t_dense / 1e9
        row = {"dense_cudnn": t_dense}
        for qt in (64, 1):
            cfg = nsa_jax.NSAConfig(select_q_tile=qt)
            n, ls, w = cfg.num_selected, cfg.select_block, cfg.window
            k_c, v_c = nsa_jax.compress(k, v, config=cfg)
            sel = nsa_jax.select_blocks(q, k_c, config=cfg)
            for impl in ("triton", "xla"):
                if impl == "xla" and (qt == 1 and T > 16384):
                    continue
                f_c = jax.jit(lambda q, kc, vc: nsa_jax.compressed_attention(
                    q, kc, vc, config=cfg, implementation=impl))
                f_s = jax.jit(lambda q, k, v, s: nsa_jax.selected_attention(
                    q, k, v, s, config=cfg, implementation=impl))
                f_w = jax.jit(lambda q, k, v: nsa_jax.sliding_window_attention(
                    q, k, v, config=cfg, implementation=impl))
                f_all = jax.jit(lambda q, k, v, g: nsa_jax.nsa_attention(
                    q, k, v, g, config=cfg, implementation=impl))
                f_sel = jax.jit(lambda q, kc: nsa_jax.select_blocks(q, kc, config=cfg,
                                                                    implementation=impl))
                t_s = bench(f_s, q, k, v, sel)
                row[f"{impl}_qt{qt}_selected"] = t_s
                row[f"{impl}_qt{qt}_selected_TFLOPs"] = 4 * HQ * T * n * ls * D / t_s / 1e9
                if qt == 64:
                    t_w = bench(f_w, q, k, v)
                    row[f"{impl}_window"] = t_w
                    row[f"{impl}_window_TFLOPs"] = 4 * HQ * T * w * D / t_w / 1e9
                    t_c = bench(f_c, q, k_c, v_c)
                    row[f"{impl}_compressed"] = t_c
                    N_c = k_c.shape[1]
                    row[f"{impl}_compressed_TFLOPs"] = 2 * HQ * T * N_c * D / t_c / 1e9
                row[f"{impl}_qt{qt}_select_blocks"] = bench(f_sel, q, k_c)
                row[f"{impl}_qt{qt}_nsa_total"] = bench(f_all, q, k, v, g)
        print(f"T={T} dense cuDNN {t_dense:.2f} ms ({dense_tf:.0f} TFLOP/s)")
        for key, val in row.items():
            print(f"  {key:32s} {val:10.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [8192, 32768])
