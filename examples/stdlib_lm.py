"""Byte-level language models on the Python standard library's own sources: dense attention, NSA,
and the sliding window alone, with the same layers, parameters, data and steps.

The corpus is text none of us wrote and every machine has: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]``, read as bytes (vocabulary 256) in sorted path order. One
file in ten (by a hash of its path) is held out for validation, so validation text is unseen
code. Each model is one stack of pre-norm blocks (attention, then a GELU MLP); the attention is an
`nsa_jax.NSAAttention` layer, and the dense and window models use its own projections around
causal `jax.nn.dot_product_attention` or around the window branch alone (its gate kept), so the
three differ only in what each query attends to.

Reported, per model: the validation loss (bits per byte) every ``--eval-every`` steps, and a
long-range retrieval probe: held-out text in which a span of ``--probe-span`` bytes from near the
start of the context is repeated at its end, farther back than the window reaches; the probe is
the loss on the repeated span's bytes against the loss on the same bytes at their first
occurrence (a model that looks the span up scores far lower the second time).

CPU smoke run (seconds):  python3 examples/stdlib_lm.py --context 256 --steps 20
The comparison the project reports needs a GPU and a context where selection matters, e.g.
python3 examples/stdlib_lm.py --context 8192 --steps 2000 --batch 8 --width 512 --depth 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nsa_jax

MODELS = ("dense", "nsa", "window")


def corpus(max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) uint8 byte streams of the standard library's .py files, files joined
    by a NUL byte; a file goes to validation when the first byte of its path's SHA-1 is a multiple
    of 10 (about one in ten)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train, val = [], []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes() + b"\0"
        except OSError:
            continue
        held_out = hashlib.sha1(str(path.relative_to(root)).encode()).digest()[0] % 10 == 0
        (val if held_out else train).append(data)
    join = lambda parts: np.frombuffer(b"".join(parts)[:max_bytes], np.uint8)
    return join(train), join(val)


class Block(nnx.Module):
    def __init__(self, kind: str, width: int, heads: int, kv_heads: int,
                 config: nsa_jax.NSAConfig, *, dtype, rngs: nnx.Rngs):
        self.kind = kind
        self.norm1 = nnx.RMSNorm(width, rngs=rngs)
        self.attn = nsa_jax.NSAAttention(heads, width, num_kv_heads=kv_heads, config=config,
                                         use_bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.RMSNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, dtype=dtype, rngs=rngs)

    def attend(self, h):
        layer = self.attn
        if self.kind == "nsa":
            return layer(h)
        q, k, v, g = layer.project(h)
        if self.kind == "dense":
            impl = "cudnn" if jax.default_backend() == "gpu" else None  # None is XLA's dense path
            return layer.out(jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                          implementation=impl))
        o_w = nsa_jax.sliding_window_attention(q, k, v, config=layer.config,
                                               implementation=layer.implementation)
        zeros = jnp.zeros_like(o_w)
        return layer.out(nsa_jax.gate_and_combine(zeros, zeros, o_w, g))

    def __call__(self, x):
        x = x + self.attend(self.norm1(x)).astype(x.dtype)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x)))).astype(x.dtype)


class ByteLM(nnx.Module):
    def __init__(self, kind: str, width: int, depth: int, heads: int, kv_heads: int,
                 config: nsa_jax.NSAConfig, *, dtype, rngs: nnx.Rngs):
        self.embed = nnx.Embed(256, width, rngs=rngs)
        self.blocks = nnx.List([Block(kind, width, heads, kv_heads, config, dtype=dtype,
                                      rngs=rngs) for _ in range(depth)])
        self.norm = nnx.RMSNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, 256, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).astype(jnp.float32))


def _windows(stream: np.ndarray, starts: np.ndarray, length: int) -> jnp.ndarray:
    return jnp.asarray(np.stack([stream[s:s + length] for s in starts]).astype(np.int32))


def probe_batch(val: np.ndarray, context: int, span: int, count: int, seed: int):
    """Held-out contexts of ``context + 1`` bytes whose last ``span`` bytes repeat the span that
    starts 16 bytes in; returns (tokens, first, second): the target positions of the span's bytes
    (after its first byte) at the first and at the repeated occurrence."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(val) - context - 1, count)
    tokens = np.stack([val[s:s + context + 1] for s in starts]).astype(np.int32)
    tokens[:, -span:] = tokens[:, 16:16 + span]
    # Logit t predicts token t + 1: byte i of a span starting at a is predicted at a + i - 1.
    first = np.arange(16 + 1, 16 + span) - 1
    second = np.arange(context + 1 - span + 1, context + 1) - 1
    return jnp.asarray(tokens), first, second


def train(kind: str, args, data) -> dict:
    train_stream, val_stream = data
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64,
                            num_selected=args.num_selected, window=args.window,
                            select_q_tile=args.select_q_tile)
    model = ByteLM(kind, args.width, args.depth, args.heads, args.kv_heads, cfg, dtype=dtype,
                   rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20),
                                                  args.steps, args.lr / 10)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.1), wrt=nnx.Param)
    bits = 1 / np.log(2)

    def nll(model, tokens):  # [B, T] per-position loss of predicting tokens[:, 1:]
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])

    @nnx.jit
    def step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(lambda m: nll(m, tokens).mean())(model)
        optimizer.update(model, grads)
        return loss

    evaluate = nnx.jit(nll)
    rng = np.random.default_rng(args.seed)
    val_starts = np.random.default_rng(1).integers(0, len(val_stream) - args.context - 1,
                                                   args.eval_batches * args.batch)
    val_batches = [_windows(val_stream, val_starts[i::args.eval_batches], args.context + 1)
                   for i in range(args.eval_batches)]
    curve, train_loss, tic = [], float("nan"), time.perf_counter()
    for i in range(1, args.steps + 1):
        starts = rng.integers(0, len(train_stream) - args.context - 1, args.batch)
        train_loss = float(step(model, optimizer, _windows(train_stream, starts, args.context + 1)))
        if i % args.eval_every == 0 or i == args.steps:
            val = float(np.mean([evaluate(model, b).mean() for b in val_batches])) * bits
            curve.append((i, val))
            print(f"{kind:6s} step {i:5d}  train {train_loss * bits:.3f}  validation {val:.3f} "
                  "bits/byte", flush=True)
    tokens, first, second = probe_batch(val_stream, args.context, args.probe_span, args.batch,
                                        seed=2)
    probe = np.asarray(evaluate(model, tokens)) * bits
    return {"validation_bits_per_byte": curve, "final_train_bits_per_byte": train_loss * bits,
            "probe_first_bits_per_byte": float(probe[:, first].mean()),
            "probe_repeat_bits_per_byte": float(probe[:, second].mean()),
            "seconds": time.perf_counter() - tic,
            "parameters": int(sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--context", type=int, default=1024, help="bytes per training sequence")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--num-selected", type=int, default=8)
    p.add_argument("--select-q-tile", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--probe-span", type=int, default=48)
    p.add_argument("--max-bytes", type=int, default=None, help="cut the corpus (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.context - args.probe_span - 16 < args.window:
        p.error(f"--context {args.context} leaves the probe's first span inside the window "
                f"({args.window}); make the context longer or the span shorter")
    data = corpus(args.max_bytes)
    print(f"{jax.devices()[0].device_kind}: train {len(data[0]):,} bytes, validation "
          f"{len(data[1]):,} bytes; context {args.context}, window {args.window}", flush=True)
    results = {kind: train(kind, args, data) for kind in args.models}
    for kind, r in results.items():
        print(f"{kind:6s} validation {r['validation_bits_per_byte'][-1][1]:.3f} bits/byte; probe: "
              f"span {r['probe_first_bits_per_byte']:.3f} at first, "
              f"{r['probe_repeat_bits_per_byte']:.3f} repeated; {r['parameters']:,} parameters; "
              f"{r['seconds']:.0f} s")
    record = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d"), "args": vars(args), "results": results}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
