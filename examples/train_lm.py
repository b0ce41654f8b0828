"""Train a small NSA language model with Flax NNX on a long-range copy task.

Each sequence is a random token prefix followed by its exact repeat, so the second half is
predictable only by looking back half a sequence, far beyond the 64-token sliding window. The
model is trained on the second half; its loss stays at chance, log(vocab), until the layers learn
to find the matching earlier tokens, then falls towards 0 (on the project's 2-core CPU with the
defaults: at chance until step ~150, 0.45 at step 180, 0.000 at 240; about a minute). On a GPU
the NSA layers run the Triton kernels, forward and backward (``implementation=None`` picks them):
on an H100 the defaults reach 0.000 by step 299 at 6.7 ms a step (bf16), and the 32k command
below takes 25.1 ms a step (timing only: 20 steps at this learning rate do not learn the task).

python3 examples/train_lm.py                       # CPU-sized defaults
python3 examples/train_lm.py --seq-len 32768 --batch 1 --steps 20 --width 1024 --heads 16 --kv-heads 2
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import nsa_jax


class Block(nnx.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, config: nsa_jax.NSAConfig, *, dtype,
                 rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(width, rngs=rngs)
        self.attn = nsa_jax.NSAAttention(heads, width, num_kv_heads=kv_heads, config=config,
                                         use_bias=False, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.RMSNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 4 * width, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x)).astype(x.dtype)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x)))).astype(x.dtype)


class LM(nnx.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, kv_heads: int,
                 config: nsa_jax.NSAConfig, *, dtype, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, heads, kv_heads, config, dtype=dtype, rngs=rngs)
                                for _ in range(layers)])
        self.norm = nnx.RMSNorm(width, rngs=rngs)
        self.out = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x).astype(jnp.float32))


def copy_batch(key, batch: int, seq_len: int, vocab: int):
    half = jax.random.randint(key, (batch, seq_len // 2), 0, vocab)
    return jnp.concatenate([half, half], axis=1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (default on a GPU)")
    args = p.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if (args.bf16 or on_gpu) else jnp.float32
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64,
                            num_selected=8, window=64, select_q_tile=64)
    model = LM(args.vocab, args.width, args.layers, args.heads, args.kv_heads, cfg, dtype=dtype,
               rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr), wrt=nnx.Param)
    half = args.seq_len // 2

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
            return nll[:, half:].mean()  # predictions of the repeated half

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(1)
    times, loss = [], None
    for i in range(args.steps):
        key, sub = jax.random.split(key)
        tokens = copy_batch(sub, args.batch, args.seq_len, args.vocab)
        t0 = time.perf_counter()
        loss = jax.block_until_ready(step(model, optimizer, tokens))
        if i:  # the first step compiles
            times.append(time.perf_counter() - t0)
        if i % max(1, args.steps // 10) == 0 or i == args.steps - 1:
            print(f"step {i:4d}  loss on the repeated half {float(loss):.3f}", flush=True)
    step_ms = 1e3 * sorted(times)[len(times) // 2] if times else float("nan")
    print(f"{jax.devices()[0].device_kind}: median step {step_ms:.1f} ms at T={args.seq_len}, "
          f"B={args.batch}; chance loss log({args.vocab}) = {jnp.log(args.vocab):.3f}")
    return {"loss": float(loss), "step_ms": step_ms}


if __name__ == "__main__":
    main()
