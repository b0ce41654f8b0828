"""`nsa-jax bench --decode`: one generation step of NSA against dense attention over the same cache.

A step appends one token per row to a cache filled to the context length and attends over it:
`nsa_jax.nsa_decode` against dense attention (`jax.nn.dot_product_attention` with per-row
lengths, cuDNN and XLA, the faster counted) over a plain K/V cache of the same length. Steps run
as generation runs them, ``STEPS`` in one jitted loop whose every step's output is the next
step's query, so the time per step is the GPU's and not the host's dispatch of a call; both
loops donate their cache, so neither copies it. A row's time is the median of ``reps`` loops.

Bytes a step must read: NSA the compressed tokens, its ``n`` selected blocks and the window of
keys and values, per row and KV head; dense the whole K/V cache. ``bound_us`` is that traffic at
the copy bandwidth measured in the same run (a read and a write of a 4 GiB array).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nsa_jax import api
from nsa_jax.compression import compress
from nsa_jax.config import NSAConfig
from nsa_jax.decode import CACHE_UNIT, NSACache, compressed_room, init_cache, nsa_decode
from nsa_jax.tools.bench import time_ms


STEPS = 16


def _ms_per_step(step, state, q, reps: int):
    """Median ms per step of ``reps`` loops of `STEPS` steps ``step(state, q) -> (o, state)``,
    each step's o the next one's q, after one warm-up loop."""
    def body(_, carry):
        o, state = step(carry[1], carry[0])
        return o, state

    run = jax.jit(lambda state, q: lax.fori_loop(0, STEPS, body, (q, state)), donate_argnums=0)
    q, state = run(state, q)
    jax.block_until_ready(q)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        q, state = run(state, q)
        jax.block_until_ready(q)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3 / STEPS


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 5) -> float:
    """Bytes per second of reading and writing an array of ``nbytes`` on the default device."""
    x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
    return 2 * nbytes / (time_ms(jax.jit(lambda x: x + 1), (x,), reps) / 1e3)


def nsa_bytes(config: NSAConfig, S: int, B: int, H: int, D: int, Dv: int, itemsize: int) -> int:
    """Cache bytes one decode step at context S must read (see the module docstring)."""
    keys = config.num_compressed(S) + min(S, config.num_selected * config.select_block) + min(
        S, config.window)
    return B * H * keys * (D + Dv) * itemsize


def _filled_cache(B, S, S_max, H, D, config, dtype):
    ks = jax.random.split(jax.random.key(S), 2)
    k = jax.random.normal(ks[0], (B, S_max, H, D), dtype)
    v = jax.random.normal(ks[1], (B, S_max, H, D), dtype)
    held = (jnp.arange(S_max) < S)[None, :, None, None]
    k, v = jnp.where(held, k, 0), jnp.where(held, v, 0)
    k_c, v_c = jax.jit(lambda k, v: compress(k, v, config=config))(k, v)
    n_c = config.num_compressed(S)
    k_c = k_c.at[:, n_c:].set(0)
    v_c = v_c.at[:, n_c:].set(0)
    room = compressed_room(config, S_max)
    pad = ((0, 0), (0, room - k_c.shape[1]), (0, 0), (0, 0))
    return NSACache(k, v, jnp.pad(k_c, pad), jnp.pad(v_c, pad), jnp.full((B,), S, jnp.int32),
                    config.compress_block, config.compress_stride)


def measure(S: int, B: int, HQ: int, H: int, D: int, *, config: NSAConfig, implementation,
            reps: int, dtype=jnp.bfloat16, tilings=None, dense: bool = True) -> dict:
    """One (context, batch, shape) point: NSA and (unless not ``dense``) dense step times in ms;
    ``tilings`` as in `nsa_decode`."""
    S_max = -(-(S + (reps + 1) * STEPS) // CACHE_UNIT) * CACHE_UNIT  # as `init_cache` rounds it
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, 1, HQ, D), dtype)
    k = jax.random.normal(ks[1], (B, 1, H, D), dtype)
    v = jax.random.normal(ks[2], (B, 1, H, D), dtype)
    g = jax.nn.sigmoid(jax.random.normal(ks[3], (B, 1, HQ, 3))).astype(dtype)
    row = dict(S=S, B=B, HQ=HQ, H=H, D=D)

    def nsa_step(cache, q):
        return nsa_decode(q, k, v, g, cache, config=config, implementation=implementation,
                          tilings=tilings)

    cache = _filled_cache(B, S, S_max, H, D, config, dtype)
    row["nsa_ms"] = _ms_per_step(nsa_step, cache, q, reps)
    del cache

    def dense_step(impl):
        def step(state, q):
            kc, vc, n = state
            rows = jnp.arange(B)
            kc = kc.at[rows, n].set(k[:, 0])
            vc = vc.at[rows, n].set(v[:, 0])
            o = jax.nn.dot_product_attention(q, kc, vc, key_value_seq_lengths=n + 1,
                                             implementation=impl)
            return o, (kc, vc, n + 1)
        return step

    impls = ("cudnn", "xla") if jax.default_backend() == "gpu" else ("xla",)
    for impl in impls if dense else ():
        kc = jax.random.normal(ks[0], (B, S_max, H, D), dtype)
        vc = jax.random.normal(ks[1], (B, S_max, H, D), dtype)
        try:
            row[f"dense_{impl}_ms"] = _ms_per_step(dense_step(impl), (kc, vc, jnp.full(
                (B,), S, jnp.int32)), q, reps)
        except Exception as err:  # cuDNN may refuse a shape
            row[f"dense_{impl}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        del kc, vc
    dense_ms = [row[k] for k in row if k.startswith("dense_") and k.endswith("_ms")]
    row["dense_ms"] = min(dense_ms) if dense_ms else None
    item = jnp.dtype(dtype).itemsize
    row["nsa_bytes"] = nsa_bytes(config, S, B, H, D, D, item)
    row["dense_bytes"] = B * H * S * 2 * D * item
    return row


def prefill_vs_forward(T: int, HQ: int, H: int, D: int, *, config: NSAConfig, implementation,
                       reps: int, dtype=jnp.bfloat16) -> dict:
    """Prefill of a T-token prompt into an empty cache against the training forward at T."""
    ks = jax.random.split(jax.random.key(T), 4)
    q = jax.random.normal(ks[0], (1, T, HQ, D), dtype)
    k = jax.random.normal(ks[1], (1, T, H, D), dtype)
    v = jax.random.normal(ks[2], (1, T, H, D), dtype)
    g = jax.nn.sigmoid(jax.random.normal(ks[3], (1, T, HQ, 3))).astype(dtype)
    cache = init_cache(1, T, H, D, config=config, dtype=dtype)
    prefill = jax.jit(lambda cache, q, k, v, g: nsa_decode(q, k, v, g, cache, config=config,
                                                          implementation=implementation))
    forward = jax.jit(lambda q, k, v, g: api.nsa_attention(q, k, v, g, config=config,
                                                         implementation=implementation))

    return dict(T=T, HQ=HQ, H=H, prefill_ms=time_ms(prefill, (cache, q, k, v, g), reps),
                forward_ms=time_ms(forward, (q, k, v, g), reps))


def run(*, contexts: Sequence[int], batches: Sequence[int], shapes, config: NSAConfig,
        implementation, reps: int, out: str, prefill_lengths: Sequence[int] = ()) -> dict:
    device = jax.devices()[0]
    bandwidth = copy_bandwidth() if jax.default_backend() == "gpu" else copy_bandwidth(1 << 28)
    print(f"{device.device_kind}, jax {jax.__version__}; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s; config {dataclasses.asdict(config)}")
    print("| shape | B | context | NSA step us | dense step us (cuDNN / XLA) | dense/NSA | "
          "NSA bytes | bound us | NSA/bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in shapes:
        for B in batches:
            for S in contexts:
                r = measure(S, B, shape.HQ, shape.H, shape.D, config=config,
                            implementation=implementation, reps=reps)
                r["bound_us"] = r["nsa_bytes"] / bandwidth * 1e6
                rows.append(r)
                fmt = lambda x: "-" if x is None else f"{1e3 * x:.0f}"
                ratio = r["dense_ms"] / r["nsa_ms"] if r["dense_ms"] else float("nan")
                print(f"| {shape.name} | {B} | {S} | {fmt(r['nsa_ms'])} | "
                      f"{fmt(r.get('dense_cudnn_ms'))} / {fmt(r.get('dense_xla_ms'))} | "
                      f"{ratio:.2f}x | {r['nsa_bytes'] / 2**20:.0f} MiB | {r['bound_us']:.0f} | "
                      f"{1e3 * r['nsa_ms'] / r['bound_us']:.1f}x |", flush=True)
    prefill = []
    for T in prefill_lengths:
        shape = shapes[0]
        p = prefill_vs_forward(T, shape.HQ, shape.H, shape.D, config=config,
                               implementation=implementation, reps=reps)
        prefill.append(p)
        print(f"prefill T={T} {shape.name}: {p['prefill_ms']:.2f} ms; training forward "
              f"{p['forward_ms']:.2f} ms", flush=True)
    record = dict(device=device.device_kind, jax=jax.__version__,
                  date=time.strftime("%Y-%m-%d"), bandwidth_bytes_per_s=bandwidth,
                  implementation=implementation, config=dataclasses.asdict(config), rows=rows,
                  prefill=prefill)
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "decode.json").write_text(json.dumps(record, indent=1))
    return record
