"""Forward branches and the layer (select_q_tile=64) at several lengths, "mosaic" beside "triton"
and cuDNN in one process; writes mosaic_lengths.json under $OUT (default: here).

Usage on a Hopper GPU: python3 benchmarks/mosaic_vs_triton.py 8192 32768 65536 131072
"""

import dataclasses
import json
import os
import sys
import time

import jax

from nsa_jax.config import NSAConfig
from nsa_jax.tools import bench

ROWS = ("dense", "compressed", "scoring_qt64", "selected_qt64", "window", "nsa_qt64",
        "dense_fwd_bwd", "nsa_qt64_fwd_bwd")


def main(lengths):
    cfg = NSAConfig()
    record = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M"), config=dataclasses.asdict(cfg), results={})
    path = os.path.join(os.environ.get("OUT", "."), "mosaic_lengths.json")
    for T in lengths:
        for shape in (bench.Shape(64, 4), bench.Shape(32, 8)):
            data = bench.prepare(shape, T, config=cfg, implementation="triton")
            for impl in ("triton", "mosaic"):
                rows = ROWS if impl == "triton" else [r for r in ROWS if "dense" not in r]
                measured = bench.measure_length(shape, data, config=cfg, implementation=impl,
                                                tilings=None, reps=5, rows=rows)
                record["results"].setdefault(shape.name, {}).setdefault(str(T), {})[impl] = {
                    name: dataclasses.asdict(row) for name, row in measured.items()}
                print(T, shape.name, impl, {name: round(row.ms, 2) if row.ms else row.error
                                            for name, row in measured.items()}, flush=True)
            del data
            with open(path, "w") as f:  # after each shape, so a cut-off run keeps what it has
                json.dump(record, f, indent=1)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
