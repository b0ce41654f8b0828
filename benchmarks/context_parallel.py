"""Context-parallel NSA: forward+backward time of one sequence of T tokens split over 1, 2, 4 ...
devices (contiguous and zig-zag layouts), the scaling efficiency t_1 / (N t_N), and the bytes each
device receives in the key/value all-gather (and sends back in the gradient's reduce-scatter).

    python benchmarks/context_parallel.py --lengths 131072 524288          # on a multi-GPU host
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python benchmarks/context_parallel.py --lengths 2048 --shape 8x2 --dim 32   # CPU check

Each row is the median of --reps timed runs of the jitted value_and_grad of a squared-output loss
of `nsa_attention` (bf16 on a GPU), with q, k, v and the gates sharded over a 1-D mesh "seq".
Results print as a table and go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import nsa_jax
from nsa_jax.tools import bench


def step_fn(cfg: nsa_jax.NSAConfig, layout: str):
    axes = nsa_jax.MeshAxes(layout=layout)

    def loss(q, k, v, g):
        o = nsa_jax.nsa_attention(q, k, v, g, config=cfg, mesh_axes=axes)
        return (o.astype(jnp.float32) ** 2).sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def gathered_bytes(T: int, n: int, H: int, D: int, Dv: int, itemsize: int) -> int:
    """Bytes of K and V one device receives in the all-gather over n devices (B = 1)."""
    return T * H * (D + Dv) * itemsize * (n - 1) // n


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--shape", default="64x4", help="HQ x H")
    p.add_argument("--dim", type=int, default=128, help="D = Dv")
    p.add_argument("--devices", type=int, nargs="*", default=None,
                   help="device counts to time (default 1, 2, 4, ... up to all)")
    p.add_argument("--layouts", nargs="+", default=["contiguous", "zigzag"])
    p.add_argument("--select-q-tile", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="context_parallel.json")
    args = p.parse_args(argv)
    HQ, H = (int(x) for x in args.shape.split("x"))
    D = args.dim
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    cfg = nsa_jax.NSAConfig(select_q_tile=args.select_q_tile)
    available = len(jax.devices())
    counts = args.devices or [2 ** i for i in range(int(math.log2(available)) + 1)]
    device = jax.devices()[0].device_kind
    print(f"{device} x {available}, jax {jax.__version__}, HQ={HQ} H={H} D={D} {dtype.__name__}")
    rows = []
    for T in args.lengths:
        ks = jax.random.split(jax.random.key(T), 4)
        q = jax.random.normal(ks[0], (1, T, HQ, D), dtype)
        k = jax.random.normal(ks[1], (1, T, H, D), dtype)
        v = jax.random.normal(ks[2], (1, T, H, D), dtype)
        g = jax.nn.sigmoid(jax.random.normal(ks[3], (1, T, HQ, 3), dtype))
        base = None
        for n in counts:
            for layout in (args.layouts if n > 1 else ["contiguous"]):
                mesh = jax.make_mesh((n,), ("seq",), devices=jax.devices()[:n])
                with jax.set_mesh(mesh):
                    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "seq")))
                    data = [put(nsa_jax.zigzag(x, n) if layout == "zigzag" else x)
                            for x in (q, k, v, g)]
                    try:
                        compiled = step_fn(cfg, layout).lower(*data).compile()
                        ms = bench.time_ms(compiled, data, args.reps)
                    except Exception as err:  # e.g. out of memory on one device
                        print(f"T={T} N={n} {layout}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:160]}")
                        continue
                base = ms if n == 1 else base
                row = dict(T=T, devices=n, layout=layout, ms=ms,
                           efficiency=None if base is None else base / (n * ms),
                           gathered_bytes=gathered_bytes(T, n, H, D, D, q.dtype.itemsize))
                rows.append(row)
                eff = "" if row["efficiency"] is None else f"{row['efficiency']:6.1%}"
                print(f"T={T:8d} N={n:2d} {layout:10s} {ms:10.2f} ms  efficiency {eff:>7s}  "
                      f"all-gather {row['gathered_bytes'] / 2**20:9.1f} MiB per device",
                      flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=device, devices=available, jax=jax.__version__, dtype=dtype.__name__,
                       HQ=HQ, H=H, D=D, config=str(cfg), rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
