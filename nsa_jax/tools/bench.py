"""`nsa-jax bench`: NSA forward and backward, whole layer and per branch, against dense causal
attention.

Every figure comes from one process: dense causal `jax.nn.dot_product_attention` (cuDNN on a GPU)
and the NSA functions on the same inputs, each compiled ahead of time, then timed as the median
of ``reps`` runs after one warm-up. Peak memory is XLA's buffer assignment of the compiled
function (arguments + outputs + temporaries); Pallas kernels keep their tiles on chip.

Useful FLOPs (docs/design.md §7): dense causal ``2*HQ*T*T*D``; selected ``4*HQ*T*n*l'*D``; window
``4*HQ*T*w*D``; compressed ``2*HQ*T*N_c*D`` (a query sees half the compressed tokens on average);
scoring recomputes the compressed logits, ``HQ*T*N_c*D``. A backward counts 2.5 times its
forward's FLOPs (five products instead of two), forward+backward 3.5 times.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nsa_jax import api, ops
from nsa_jax.compression import compress
from nsa_jax.config import NSAConfig
from nsa_jax.kernels.triton.tiling import Tiling, TritonTilings, default_tilings
from nsa_jax.module import NSAAttention

FORWARD_ROWS = ("dense", "nsa_qt64", "nsa_per_token", "compressed", "scoring_qt64",
                "scoring_per_token", "selected_qt64", "selected_per_token", "window")
# *_fwd_bwd: forward and all input gradients; *_bwd: the backward alone, from saved residuals.
BACKWARD_ROWS = ("dense_fwd_bwd", "nsa_qt64_fwd_bwd", "nsa_per_token_fwd_bwd", "dense_bwd",
                 "compressed_bwd", "selected_qt64_bwd", "selected_per_token_bwd", "window_bwd")
ROWS = FORWARD_ROWS + BACKWARD_ROWS
# Packed documents: the layer (segment_ids) against dense causal attention restricted to each
# document (cuDNN's packed layout on a GPU), forward and forward+backward.
PACKED_ROWS = ("dense_packed", "nsa_qt64_packed", "nsa_per_token_packed", "dense_packed_fwd_bwd",
               "nsa_qt64_packed_fwd_bwd", "nsa_per_token_packed_fwd_bwd")
# Rows a tiling of each kernel affects, timed together by `tune`.
TUNED_BY = {"compressed": ("compressed",), "scoring": ("scoring_qt64",),
            "scoring_per_token": ("scoring_per_token",),
            "selected": ("selected_qt64",), "selected_per_token": ("selected_per_token",),
            "selected_by_block": ("selected_per_token",), "window": ("window",),
            "compressed_bwd": ("compressed_bwd",),
            "selected_bwd": ("selected_qt64_bwd", "selected_per_token_bwd"),
            "selected_by_block_bwd": ("selected_per_token_bwd",),
            "window_bwd": ("window_bwd",)}
CANDIDATES = tuple(Tiling(rows=r, block_k=bk, num_warps=w, num_stages=s) for r, bk, w, s in (
    (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3),
    (128, 128, 8, 2), (64, 128, 4, 2), (256, 64, 8, 2), (256, 128, 8, 2)))
# A per-token program has only G_pad rows, so only the launch parameters matter.
PER_TOKEN_CANDIDATES = tuple(Tiling(rows=16, block_k=64, num_warps=w, num_stages=s)
                             for w in (1, 2, 4) for s in (1, 2, 3))


@dataclasses.dataclass(frozen=True)
class Shape:
    """B=1 attention shape: HQ query heads sharing H KV heads of head dim D (= Dv)."""

    HQ: int
    H: int
    D: int = 128

    @property
    def name(self) -> str:
        return f"HQ{self.HQ}-H{self.H}-D{self.D}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'HQxH' or 'HQxHxD', e.g. '64x4' or '32x8x128'."""
        try:
            parts = [int(p) for p in text.lower().split("x")]
            shape = cls(*parts)
        except (TypeError, ValueError):
            raise ValueError(f"shape {text!r} must read HQxH or HQxHxD, e.g. 64x4") from None
        if min(parts) < 1 or shape.HQ % shape.H:
            raise ValueError(f"shape {text!r}: HQ must be a positive multiple of H")
        return shape


@dataclasses.dataclass
class Row:
    ms: float | None = None
    tflops: float | None = None
    peak_bytes: int | None = None
    error: str | None = None


def time_ms(compiled, args, reps: int) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def ms_or_error(fn: Callable, *args, reps: int = 5) -> float | str:
    """Median ms of jitted ``fn`` on ``args``, or the error that stopped it compiling or running
    (a tiling over the GPU's shared memory, say), so that a sweep records it and goes on."""
    try:
        return round(time_ms(jax.jit(fn).lower(*args).compile(), args, reps), 3)
    except Exception as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"


def sweep(lengths: Sequence[int], measure: Callable[[Shape, int], dict], path: str) -> None:
    """``measure(shape, T)`` at every length, for HQ64/H4 and HQ32/H8, into JSON at ``path``
    with the device, jax version and date, rewritten after each shape so that a run cut off by a
    time limit keeps what it measured."""
    record = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M"), results={})
    for T in lengths:
        for shape in (Shape(64, 4), Shape(32, 8)):
            record["results"].setdefault(shape.name, {})[str(T)] = measure(shape, T)
            with open(path, "w") as f:
                json.dump(record, f, indent=1)


def _peak_bytes(compiled) -> int | None:
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


def _measure(fn: Callable, args, reps: int, flops: float | None) -> Row:
    try:
        compiled = jax.jit(fn).lower(*args).compile()
        ms = time_ms(compiled, args, reps)
    except Exception as err:  # a tiling that does not fit this GPU (e.g. shared memory) fails here
        return Row(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return Row(ms=ms, tflops=None if flops is None else flops / ms / 1e9,
               peak_bytes=_peak_bytes(compiled))


def _inputs(shape: Shape, T: int, dtype):
    ks = jax.random.split(jax.random.key(T), 4)
    q = jax.random.normal(ks[0], (1, T, shape.HQ, shape.D), dtype)
    k = jax.random.normal(ks[1], (1, T, shape.H, shape.D), dtype)
    v = jax.random.normal(ks[2], (1, T, shape.H, shape.D), dtype)
    g = jax.nn.sigmoid(jax.random.normal(ks[3], (1, T, shape.HQ, 3))).astype(dtype)
    return q, k, v, g


def _dense_impl() -> str | None:
    return "cudnn" if jax.default_backend() == "gpu" else None


def prepare(shape: Shape, T: int, *, config: NSAConfig, implementation: str, dtype=jnp.bfloat16):
    """Inputs of every row at length T: q, k, v, g, the compressed tokens, the compressed
    log-sum-exp and both selections (default tilings; a tiling does not change them)."""
    q, k, v, g = _inputs(shape, T, dtype)
    kw = dict(implementation=implementation)
    k_c, v_c = jax.jit(lambda k, v: compress(k, v, config=config))(k, v)
    _, lse = jax.jit(lambda q, kc, vc: api.compressed_attention(q, kc, vc, config=config, **kw))(
        q, k_c, v_c)
    data = dict(q=q, k=k, v=v, g=g, k_c=k_c, v_c=v_c, lse=lse)
    for q_tile in (64, 1):
        cfg = dataclasses.replace(config, select_q_tile=q_tile)
        data[f"sel_{q_tile}"] = jax.jit(lambda q, kc, lse: api.select_blocks(
            q, kc, config=cfg, lse=lse, **kw))(q, k_c, lse)
    return data


def measure_length(shape: Shape, data: dict, *, config: NSAConfig, implementation: str,
                   tilings: TritonTilings | None, reps: int,
                   rows: Sequence[str] = ROWS) -> dict[str, Row]:
    """Times ``rows`` (names from `ROWS`) on ``data`` from `prepare`; returns name -> Row."""
    q, k, v, g, k_c, v_c, lse = (data[n] for n in ("q", "k", "v", "g", "k_c", "v_c", "lse"))
    T, HQ, D = q.shape[1], shape.HQ, shape.D
    N_c = k_c.shape[1]
    cfg64 = dataclasses.replace(config, select_q_tile=64)
    cfg1 = dataclasses.replace(config, select_q_tile=1)
    kw = dict(implementation=implementation, tilings=tilings)
    sel = {"qt64": data["sel_64"], "per_token": data["sel_1"]}
    n, ls, w = config.num_selected, config.select_block, config.window
    dense_impl = _dense_impl()
    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation=dense_impl)
    branch = {  # name -> (function of its differentiable inputs, those inputs, forward FLOPs)
        "dense": (dense, (q, k, v), 2 * HQ * T * T * D),
        "compressed": (lambda q, kc, vc: api.compressed_attention(q, kc, vc, config=config, **kw)[0],
                       (q, k_c, v_c), 2 * HQ * T * N_c * D),
        "selected_qt64": (lambda q, k, v: api.selected_attention(q, k, v, sel["qt64"], config=cfg64,
                                                                 **kw),
                          (q, k, v), 4 * HQ * T * n * ls * D),
        "selected_per_token": (lambda q, k, v: api.selected_attention(q, k, v, sel["per_token"],
                                                                      config=cfg1, **kw),
                               (q, k, v), 4 * HQ * T * n * ls * D),
        "window": (lambda q, k, v: api.sliding_window_attention(q, k, v, config=config, **kw),
                   (q, k, v), 4 * HQ * T * w * D),
        "nsa_qt64": (lambda q, k, v, g: api.nsa_attention(q, k, v, g, config=cfg64, **kw),
                     (q, k, v, g), None),
        "nsa_per_token": (lambda q, k, v, g: api.nsa_attention(q, k, v, g, config=cfg1, **kw),
                          (q, k, v, g), None),
    }
    scoring = {
        "scoring_qt64": (lambda q, kc, lse: api.select_blocks(q, kc, config=cfg64, lse=lse, **kw),
                         (q, k_c, lse), HQ * T * N_c * D),
        "scoring_per_token": (lambda q, kc, lse: api.select_blocks(q, kc, config=cfg1, lse=lse,
                                                                   **kw),
                              (q, k_c, lse), HQ * T * N_c * D),
    }

    def spec(name: str):
        if name in scoring:
            return scoring[name]
        if name in branch:
            return branch[name]
        if name.endswith("_fwd_bwd"):  # gradients of <o, ct> with respect to every float input
            fn, args, flops = branch[name.removesuffix("_fwd_bwd")]
            ct = jax.random.normal(jax.random.key(1), jax.eval_shape(fn, *args).shape, q.dtype)
            loss = lambda *a: jnp.sum(fn(*a[:-1]).astype(jnp.float32) * a[-1].astype(jnp.float32))
            return (jax.grad(loss, argnums=tuple(range(len(args)))), (*args, ct),
                    None if flops is None else 3.5 * flops)
        fn, args, flops = branch[name.removesuffix("_bwd")]  # backward alone, residuals given
        out, f_vjp = jax.vjp(fn, *args)
        ct = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
        return (lambda f_vjp, ct: f_vjp(ct)), (f_vjp, ct), None if flops is None else 2.5 * flops

    out = {}
    for name in rows:
        fn, args, flops = spec(name)
        out[name] = _measure(fn, args, reps, flops)
    return out


def document_lengths(T: int, shortest: int, longest: int, seed: int = 0) -> list[int]:
    """Lengths drawn uniformly from [shortest, longest] until they fill T; the last is cut to fit."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < T:
        lengths.append(int(rng.integers(shortest, longest + 1)))
    lengths[-1] -= sum(lengths) - T
    return lengths


def packed_dense(q, k, v, lengths: Sequence[int]):
    """Causal attention inside each document of a packed row: cuDNN's packed (ragged offsets)
    layout on a GPU, a dense [T, T] document mask elsewhere (small T only)."""
    cu = np.cumsum([0, *lengths])
    if jax.default_backend() == "gpu":
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention
        seqlen = jnp.asarray([lengths], jnp.int32)  # [B=1, M]
        offsets = jnp.asarray([cu], jnp.int32)  # [B=1, M + 1]
        return dot_product_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets,
                                     kv_offsets=offsets, scale=q.shape[-1] ** -0.5,
                                     mask_type=MaskType.PADDING_CAUSAL)
    doc = np.searchsorted(cu, np.arange(q.shape[1]), side="right")
    mask = (doc[:, None] == doc[None, :]) & np.tri(q.shape[1], dtype=bool)
    return jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[None, None])


def measure_packed(shape: Shape, T: int, lengths: Sequence[int], *, config: NSAConfig,
                   implementation: str, tilings: TritonTilings | None, reps: int,
                   rows: Sequence[str] = PACKED_ROWS) -> dict[str, Row]:
    """Times ``rows`` (from `PACKED_ROWS`) on one packed row of documents of ``lengths``."""
    q, k, v, g = _inputs(shape, T, jnp.bfloat16)
    seg = jnp.asarray(np.repeat(np.arange(1, len(lengths) + 1), lengths)[None], jnp.int32)
    # The number of documents is known, as it is to a data loader that packs them.
    kw = dict(implementation=implementation, tilings=tilings, segment_ids=seg,
              max_segments=len(lengths))
    cfg = {"qt64": dataclasses.replace(config, select_q_tile=64),
           "per_token": dataclasses.replace(config, select_q_tile=1)}
    dense_flops = sum(2 * shape.HQ * L * L * shape.D for L in lengths)
    fns = {"dense_packed": (lambda q, k, v: packed_dense(q, k, v, lengths), (q, k, v), dense_flops)}
    for name, c in cfg.items():
        fns[f"nsa_{name}_packed"] = (
            lambda q, k, v, g, c=c: api.nsa_attention(q, k, v, g, config=c, **kw), (q, k, v, g), None)
    out = {}
    for name in rows:
        fn, args, flops = fns[name.removesuffix("_fwd_bwd")]
        if name.endswith("_fwd_bwd"):
            ct = jax.random.normal(jax.random.key(1), jax.eval_shape(fn, *args).shape, q.dtype)
            loss = lambda *a, fn=fn: jnp.sum(fn(*a[:-1]).astype(jnp.float32) * a[-1].astype(jnp.float32))
            fn, args = jax.grad(loss, argnums=tuple(range(len(args)))), (*args, ct)
            flops = None if flops is None else 3.5 * flops
        out[name] = _measure(fn, args, reps, flops)
    return out


class _DenseTwin(nnx.Module):
    """The projections of an `NSAAttention` layer around dense causal attention instead of NSA."""

    def __init__(self, layer: NSAAttention):
        self.layer = layer

    def __call__(self, x):
        q, k, v, _ = self.layer.project(x)
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=_dense_impl())
        return self.layer.out(o)


def train_step_ms(shape: Shape, T: int, *, config: NSAConfig, implementation: str,
                  tilings: TritonTilings | None, reps: int, width: int = 2048) -> dict[str, Row]:
    """Step time of a jitted NNX training step (AdamW) of one attention layer, [1, T, width]
    inputs, bf16 compute, regression loss: NSA with ``select_q_tile=64`` against the same layer's
    projections around dense attention."""
    cfg = dataclasses.replace(config, select_q_tile=64)
    layer = NSAAttention(shape.HQ, width, shape.HQ * shape.D, num_kv_heads=shape.H, config=cfg,
                         use_bias=False, use_rope=False, implementation=implementation,
                         tilings=tilings, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ks = jax.random.split(jax.random.key(T), 2)
    x = jax.random.normal(ks[0], (1, T, width), jnp.bfloat16)
    y = jax.random.normal(ks[1], (1, T, width), jnp.float32)
    out = {}
    for name, model in (("dense_train_step", _DenseTwin(layer)), ("nsa_qt64_train_step", layer)):
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x, y):
            loss_fn = lambda model: jnp.mean((model(x).astype(jnp.float32) - y) ** 2)
            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        try:
            jax.block_until_ready(step(model, optimizer, x, y))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(step(model, optimizer, x, y))
                times.append(time.perf_counter() - t0)
            out[name] = Row(ms=float(np.median(times)) * 1e3)
        except Exception as err:
            out[name] = Row(error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return out


def tune(shape: Shape, T: int, *, config: NSAConfig, reps: int, start: TritonTilings,
         candidates: Sequence[Tiling] = CANDIDATES, log=print) -> TritonTilings:
    """Per kernel, the candidate with the lowest summed time of the rows it affects (the other
    kernels keep their current best)."""
    best = start
    data = prepare(shape, T, config=config, implementation="triton")
    for kernel, rows in TUNED_BY.items():
        results = []
        for cand in (PER_TOKEN_CANDIDATES if kernel == "selected_per_token" else candidates):
            tilings = dataclasses.replace(best, **{kernel: cand})
            measured = measure_length(shape, data, config=config, implementation="triton",
                                      tilings=tilings, reps=reps, rows=rows)
            failed = [r.error for r in measured.values() if r.error]
            total = None if failed else sum(r.ms for r in measured.values())
            results.append((total, cand))
            log(f"  tune {shape.name} T={T} {kernel:10s} {_tiling_str(cand):28s} "
                + (f"{total:9.3f} ms" if total is not None else f"failed: {failed[0]}"))
        ok = [(t, c) for t, c in results if t is not None]
        if ok:
            best = dataclasses.replace(best, **{kernel: min(ok, key=lambda tc: tc[0])[1]})
    return best


def _tiling_str(t: Tiling) -> str:
    return f"rows={t.rows} bk={t.block_k} w={t.num_warps} s={t.num_stages}"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def baseline(name: str) -> str:
    """The dense row a row's speed-up is measured against."""
    if name.endswith("_train_step"):
        return "dense_train_step"
    if name.endswith("_packed_fwd_bwd"):
        return "dense_packed_fwd_bwd"
    if name.endswith("_packed"):
        return "dense_packed"
    if name.endswith("_fwd_bwd"):
        return "dense_fwd_bwd"
    return "dense_bwd" if name.endswith("_bwd") else "dense"


def table_header(shape: Shape) -> str:
    return (f"{shape.name}, bf16, B=1 (ms; useful TFLOP/s; speed-up = dense ms / row ms, dense "
            f"forward, backward or both alike; "
            f"peak = compiled arguments + outputs + temporaries)\n"
            f"{'T':>7s} {'row':23s} {'ms':>10s} {'TFLOP/s':>8s} {'speed-up':>9s} {'peak':>10s}")


def table_rows(results: dict[int, dict[str, Row]]) -> str:
    lines = []
    for T, rows in results.items():
        for name, r in rows.items():
            dense = rows.get(baseline(name))
            if r.error:
                lines.append(f"{T:7d} {name:23s} failed: {r.error}")
                continue
            tf = "-" if r.tflops is None else f"{r.tflops:.3g}"
            up = "-" if dense is None or dense.ms is None else f"{dense.ms / r.ms:.2f}x"
            lines.append(f"{T:7d} {name:23s} {r.ms:10.3f} {tf:>8s} {up:>9s} "
                         f"{_fmt_bytes(r.peak_bytes):>10s}")
    return "\n".join(lines)


def plot(all_results: dict[str, dict[int, dict[str, Row]]], path: pathlib.Path,
         title: str = "") -> None:
    """Times (top) and speed-ups over dense (bottom) per shape and group of rows: lines over T, or
    bars when one T was measured. ``title``: the device and versions, above every panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in (FORWARD_ROWS, BACKWARD_ROWS, PACKED_ROWS)
              if any(n in rows for res in all_results.values() for rows in res.values() for n in g)]
    if not groups:
        return
    fig, axes = plt.subplots(2 * len(groups), len(all_results),
                             figsize=(6 * len(all_results), 4 * 2 * len(groups)), squeeze=False)
    for col, (shape_name, results) in enumerate(all_results.items()):
        lengths = sorted(results)
        for gi, group in enumerate(groups):
            top, bottom = axes[2 * gi, col], axes[2 * gi + 1, col]
            kind = {FORWARD_ROWS: "forward", BACKWARD_ROWS: "backward / forward+backward",
                    PACKED_ROWS: "packed documents"}[group]
            if len(lengths) == 1:
                _bars(top, bottom, group, results[lengths[0]])
                top.set_title(f"{shape_name}, bf16, T={lengths[0]}")
                top.set_xlabel(f"{kind} ms")
                continue
            for name in group:
                pts = [(T, results[T][name].ms) for T in lengths
                       if name in results[T] and results[T][name].ms is not None]
                if not pts:
                    continue
                main = name.startswith(("dense", "nsa"))
                style = dict(lw=2.5) if main else dict(lw=1, ls="--")
                style["color"] = f"C{group.index(name) % 10}"
                top.plot(*zip(*pts), marker="o", label=name, **style)
                base = baseline(name)
                ups = [(T, results[T][base].ms / m) for T, m in pts
                       if name != base and base in results[T] and results[T][base].ms]
                if ups:
                    bottom.plot(*zip(*ups), marker="o", label=name, **style)
            for ax in (top, bottom):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("T (tokens)")
                ax.grid(True, which="both", alpha=0.3)
            top.set_yscale("log")
            top.set_ylabel(f"{kind} ms")
            top.set_title(f"{shape_name}, bf16")
            bottom.axhline(1.0, color="k", lw=0.8)
            bottom.set_ylabel("speed-up over dense (x)")
            top.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(top, bottom, group, rows: dict[str, Row]) -> None:
    """One T: a bar per measured row of ``group`` (ms, log scale) and per speed-up over dense."""
    names = [n for n in group if n in rows and rows[n].ms is not None]
    y = range(len(names))
    top.barh(y, [rows[n].ms for n in names], color=[f"C{group.index(n) % 10}" for n in names])
    top.set_yticks(list(y), names, fontsize=7)
    top.set_xscale("log")
    top.invert_yaxis()
    top.grid(True, axis="x", which="both", alpha=0.3)
    ups = [(n, rows[baseline(n)].ms / rows[n].ms) for n in names
           if n != baseline(n) and baseline(n) in rows and rows[baseline(n)].ms]
    if ups:
        yu = range(len(ups))
        bottom.barh(yu, [u for _, u in ups], color=[f"C{group.index(n) % 10}" for n, _ in ups])
        bottom.set_yticks(list(yu), [n for n, _ in ups], fontsize=7)
        bottom.invert_yaxis()
    bottom.axvline(1.0, color="k", lw=0.8)
    bottom.set_xlabel("speed-up over dense (x)")
    bottom.grid(True, axis="x", alpha=0.3)


def run(*, lengths: Sequence[int], shapes: Sequence[Shape], reps: int = 5,
        implementation: str | None = None, tune_length: int | None = None,
        rows: Sequence[str] = ROWS, train_lengths: Sequence[int] = (),
        packed_lengths: Sequence[int] = (), document_range: tuple[int, int] = (1024, 16384),
        out: str | pathlib.Path = "nsa_bench_out", config: NSAConfig | None = None,
        log=print) -> dict:
    """Runs the benchmark, prints tables, writes ``bench.json`` and ``bench.png`` under ``out``.

    ``packed_lengths``: rows of T tokens packed with documents of lengths drawn from
    ``document_range`` (`measure_packed`; forward only with ``rows`` = `FORWARD_ROWS`)."""
    config = NSAConfig() if config is None else config
    if implementation is None:  # the first natively available: "mosaic", "triton", "xla"
        implementation = next(name for name in ("mosaic", "triton", "xla")
                              if ops.get(name).available(False))
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    log(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"implementation={implementation}, dense={_dense_impl() or 'xla'}")
    record = {"device": device.device_kind, "jax": jax.__version__, "implementation": implementation,
              "date": time.strftime("%Y-%m-%d"), "config": dataclasses.asdict(config), "shapes": {}}
    all_results = {}
    for shape in shapes:
        tilings = default_tilings() if implementation == "triton" else None
        if tune_length and implementation == "triton":
            tilings = tune(shape, tune_length, config=config, reps=reps, start=tilings, log=log)
            log(f"best tilings for {shape.name} at T={tune_length}: {tilings!r}")
        results = {}
        log(table_header(shape))
        for T in lengths:
            data = prepare(shape, T, config=config, implementation=implementation)
            results[T] = measure_length(shape, data, config=config, implementation=implementation,
                                        tilings=tilings, reps=reps, rows=rows)
            del data
            log(table_rows({T: results[T]}))
        for T in train_lengths:
            results.setdefault(T, {}).update(train_step_ms(
                shape, T, config=config, implementation=implementation, tilings=tilings, reps=reps))
            log(table_rows({T: {n: r for n, r in results[T].items() if n.endswith("_train_step")}}))
        for T in packed_lengths:
            docs = document_lengths(T, *document_range, seed=T)
            packed_rows = [n for n in PACKED_ROWS if rows != FORWARD_ROWS or "fwd_bwd" not in n]
            log(f"packed T={T}: {len(docs)} documents, lengths {docs}")
            record.setdefault("packed_documents", {})[str(T)] = docs
            results.setdefault(T, {}).update(measure_packed(
                shape, T, docs, config=config, implementation=implementation, tilings=tilings,
                reps=reps, rows=packed_rows))
            log(table_rows({T: {n: r for n, r in results[T].items() if "_packed" in n}}))
        all_results[shape.name] = results
        record["shapes"][shape.name] = {
            "tilings": None if tilings is None else dataclasses.asdict(tilings),
            "results": {str(T): {n: dataclasses.asdict(r) for n, r in rows.items()}
                        for T, rows in results.items()}}
    (out / "bench.json").write_text(json.dumps(record, indent=1))
    plot(all_results, out / "bench.png",
         title=f"{device.device_kind}, jax {jax.__version__}, implementation={implementation}, "
               f"{record['date']}")
    log(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return record
