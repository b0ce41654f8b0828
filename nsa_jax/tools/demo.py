"""Train a small NSA transformer on long-range key-value retrieval and plot what it selects.

The task. A sequence of ``seq_len`` tokens is random filler with ``num_pairs`` needles hidden in
it. A needle is a run of ``pair_len`` copies of one pair token, whose id encodes a key and a value
(``num_keys * num_values`` ids). The sequence ends with ``num_pairs * num_rounds`` query tokens,
each stored key once per round in a fresh order, and at each query the model must name the value
stored under that key. Loss and accuracy count only those answer positions, so chance is
``1 / num_values``. Needles lie after block 0 and end more than ``window`` tokens before the first
query, outside every block the query tiles are forced to select: neither the sliding window nor a
forced block sees them, so answers have to come through the compressed branch or through blocks
the selection picked.

Why these defaults (they finish inside five minutes on a 2-core CPU, compilation included):

- ``window=64``: a 2k context is ~30 windows long and the window never reaches a needle.
- ``compress_block=32, compress_stride=16, select_block=64``: the paper's block sizes.
- ``select_q_tile=64``: one selection per tile of 64 queries makes the selected branch a few large
  gathers instead of one per token, which keeps CPU steps cheap. The 64 queries fill the last
  tile exactly, so that tile's selection has to cover all 4 needles.
- ``num_selected=8``: block 0 and the tile's two local blocks are forced, leaving 5 slots chosen
  by score for the 4 needle blocks among 29 candidates.
- Needles of 8 tokens rather than 1: selection learns only through the compressed branch, whose
  keys are means over 32 tokens. A single pair token is 1/32 of such a mean: with one-token
  needles 1000 steps reached 23% against 12.5% chance, while runs of 8 are found in ~150 steps.
- 16 query rounds: 64 answers per sequence give 16x the gradient signal of one round at the same
  attention cost.
- One block, 64 wide, 4 query heads over 2 KV heads (G=2), no RoPE: the lookup is by content
  only and a single layer without rotary phases learns it fastest (RoPE also learns, more slowly).
- AdamW at 1e-2 with 10% warmup and cosine decay over 300 steps of 8 sequences.

Measured with these defaults on the project's 2-core CPU ("xla" implementation): 80%, 88% and 88%
held-out accuracy for seeds 0, 1 and 2 against 6.25% chance, in 2 min 53 s to 3 min 10 s. On an
H100 ("triton" kernels, forward and backward, the default there): 81.9% for seed 0 in 42 s.
After the layer took `nnx.MultiHeadAttention`'s shape (2026-12-02, same CPU, seed 0): 80.5% in
2 min 40 s. Control runs (``branches``), same seed: the window alone 5.6%, the compressed branch
and the window 5.5%, i.e. chance: the answers come through the selected blocks.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import nsa_jax
from nsa_jax.ops import selection

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

BRANCHES = ("compressed", "selected", "window")
_NSA = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64, num_selected=8,
                         num_initial=1, num_local=2, window=64, select_q_tile=64)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything the demo trains with; the module docstring explains the defaults.

    Attributes:
      steps: optimiser steps.
      seq_len: T, tokens per sequence.
      batch_size: sequences per step (and per held-out batch).
      seed: seeds initialisation, training data and held-out data.
      learning_rate: peak AdamW learning rate.
      eval_batches: held-out batches the accuracy is averaged over.
      num_keys, num_values: a pair token stores one of ``num_keys`` keys with one of
        ``num_values`` values.
      num_pairs: needles per sequence, with distinct keys.
      num_rounds: times each stored key is asked at the end.
      num_filler: filler vocabulary.
      pair_len: tokens per needle (copies of its pair token).
      width, depth: model width and number of blocks.
      num_heads, num_kv_heads, head_dim: HQ, H and D of each NSA layer.
      use_rope: rotary embeddings in the NSA layers.
      nsa: the layers' `NSAConfig`.
      implementation: NSA implementation (None: the fastest available).
      interpret: run Pallas kernels in interpret mode (``implementation="triton"`` on a CPU).
      branches: the NSA branches the layers use; a control run leaves some out (their outputs
        are zero, the gates of the others unchanged), e.g. ``("window",)`` to show that the
        window alone cannot reach the needles.
      devices: train on this many devices (`mesh_shape`: data parallel over 2 when the count
        and the batch allow it, context parallel over the rest); 1: one device.
    """

    steps: int = 300
    seq_len: int = 2048
    batch_size: int = 8
    seed: int = 0
    learning_rate: float = 1e-2
    eval_batches: int = 4
    num_keys: int = 8
    num_values: int = 16
    num_pairs: int = 4
    num_rounds: int = 16
    num_filler: int = 8
    pair_len: int = 8
    width: int = 64
    depth: int = 1
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    use_rope: bool = False
    nsa: nsa_jax.NSAConfig = _NSA
    implementation: str | None = None
    interpret: bool = False
    branches: tuple[str, ...] = BRANCHES
    devices: int = 1

    def __post_init__(self):
        for name in ("steps", "seq_len", "batch_size", "eval_batches", "num_keys", "num_values",
                     "num_pairs", "num_rounds", "num_filler", "pair_len", "width", "depth",
                     "num_heads", "num_kv_heads", "head_dim", "devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} needs as many distinct keys, but "
                             f"num_keys={self.num_keys}")
        if not self.branches or not set(self.branches) <= set(BRANCHES):
            raise ValueError(f"branches={self.branches!r} must be a non-empty subset of "
                             f"{BRANCHES}")
        make_task(self)
        data, seq = mesh_shape(self)
        if self.seq_len % (seq * self.nsa.select_q_tile):
            raise ValueError(f"devices={self.devices} puts seq_len={self.seq_len} over {seq} "
                             f"devices; each one's run must be a multiple of select_q_tile="
                             f"{self.nsa.select_q_tile}")
        if self.branches != BRANCHES and self.devices > 1:
            raise ValueError("control runs (branches) run on one device")


def mesh_shape(cfg: DemoConfig) -> tuple[int, int]:
    """(data, seq): the demo's mesh for ``cfg.devices``: 2-way data parallel when the device
    count is even, at least 4, and the batch splits in two; context parallel over the rest."""
    data = 2 if cfg.devices >= 4 and cfg.devices % 2 == 0 and cfg.batch_size % 2 == 0 else 1
    return data, cfg.devices // data


def _place(*xs):
    """[B, T] arrays sharded over the demo's mesh (B over "data" when it divides, T over
    "seq"); unchanged without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return xs
    data = dict(zip(mesh.axis_names, mesh.axis_sizes))["data"]
    return tuple(jax.sharding.reshard(x, P("data" if x.shape[0] % data == 0 else None, "seq"))
                 for x in xs)


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    """Layout of the retrieval sequences; hashable, so jitted functions take it as static.

    Token ids: ``[0, num_filler)`` filler, then the pair tokens (``key * num_values + value``),
    then one query token per key, then one value token per value (targets only).

    Attributes:
      seq_len, num_keys, num_values, num_pairs, num_rounds, num_filler, pair_len: as in
        `DemoConfig`.
      lo, hi: needles lie inside positions ``[lo, hi)``.
    """

    seq_len: int
    num_keys: int
    num_values: int
    num_pairs: int
    num_rounds: int
    num_filler: int
    pair_len: int
    lo: int
    hi: int

    @property
    def tail(self) -> int:
        """Query tokens at the end of the sequence."""
        return self.num_pairs * self.num_rounds

    @property
    def pair_base(self) -> int:
        return self.num_filler

    @property
    def query_base(self) -> int:
        return self.pair_base + self.num_keys * self.num_values

    @property
    def value_base(self) -> int:
        return self.query_base + self.num_keys

    @property
    def vocab_size(self) -> int:
        return self.value_base + self.num_values

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values


def make_task(cfg: DemoConfig) -> RetrievalTask:
    """Places the needle region out of reach of the window and of the forced blocks.

    The region starts after the initial blocks and stops at the start of the block holding the
    key ``window`` tokens before the first query; the query tiles' local blocks come after that
    whenever a tile is no larger than a selection block.
    """
    nsa = cfg.nsa
    tail = cfg.num_pairs * cfg.num_rounds
    lo = nsa.num_initial * nsa.select_block
    hi = (cfg.seq_len - tail - nsa.window) // nsa.select_block * nsa.select_block
    if (hi - lo) // cfg.pair_len < cfg.num_pairs:
        raise ValueError(
            f"seq_len={cfg.seq_len} has no room for {cfg.num_pairs} needles of {cfg.pair_len} tokens "
            f"between the initial blocks and window={nsa.window} tokens before the {tail} queries")
    return RetrievalTask(cfg.seq_len, cfg.num_keys, cfg.num_values, cfg.num_pairs, cfg.num_rounds,
                         cfg.num_filler, cfg.pair_len, lo, hi)


def make_batch(key, task: RetrievalTask, batch_size: int):
    """Samples retrieval sequences.

    Returns:
      tokens int32[B, T]; targets int32[B, T] (the value token at answer positions, 0 elsewhere);
      answer bool[B, T], true at the query positions; pair_pos int32[B, num_pairs], the first
      token of each needle.
    """
    T, P, L = task.seq_len, task.num_pairs, task.pair_len
    k_fill, k_pos, k_keys, k_vals, k_order = jax.random.split(key, 5)
    tokens = jax.random.randint(k_fill, (batch_size, T), 0, task.num_filler, jnp.int32)
    # Needles start on a grid of L tokens from a block boundary, so they never overlap and, when
    # L divides the selection block, never straddle two blocks.
    slots = jax.vmap(lambda k: jax.random.choice(k, (task.hi - task.lo) // L, (P,), replace=False))(
        jax.random.split(k_pos, batch_size))
    pair_pos = (task.lo + slots * L).astype(jnp.int32)
    keys = jax.vmap(lambda k: jax.random.permutation(k, task.num_keys)[:P])(
        jax.random.split(k_keys, batch_size))
    values = jax.random.randint(k_vals, (batch_size, P), 0, task.num_values, jnp.int32)
    rows = jnp.arange(batch_size)[:, None]
    needle = (pair_pos[..., None] + jnp.arange(L)).reshape(batch_size, P * L)
    tokens = tokens.at[rows, needle].set(
        jnp.repeat(task.pair_base + keys * task.num_values + values, L, axis=1))
    order = jax.vmap(lambda k: jax.random.permutation(k, P))(
        jax.random.split(k_order, batch_size * task.num_rounds)).reshape(batch_size, task.tail)
    tokens = tokens.at[:, T - task.tail:].set(task.query_base + jnp.take_along_axis(keys, order, 1))
    targets = jnp.zeros((batch_size, T), jnp.int32).at[:, T - task.tail:].set(
        task.value_base + jnp.take_along_axis(values, order, 1))
    answer = jnp.zeros((batch_size, T), bool).at[:, T - task.tail:].set(True)
    return tokens, targets, answer, pair_pos


class Block(nnx.Module):
    """Pre-norm residual block: NSA attention, then a GELU MLP."""

    def __init__(self, cfg: DemoConfig, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(cfg.width, rngs=rngs)
        self.attn = nsa_jax.NSAAttention(cfg.num_heads, cfg.width, cfg.num_heads * cfg.head_dim,
                                         num_kv_heads=cfg.num_kv_heads, config=cfg.nsa,
                                         use_bias=False, use_rope=cfg.use_rope,
                                         implementation=cfg.implementation,
                                         interpret=cfg.interpret, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.width, rngs=rngs)
        self.up = nnx.Linear(cfg.width, 4 * cfg.width, rngs=rngs)
        self.down = nnx.Linear(4 * cfg.width, cfg.width, rngs=rngs)
        self.branches = cfg.branches

    def __call__(self, x):
        h = self.attn_norm(x)
        x = x + (self.attn(h) if self.branches == BRANCHES else self._control(h))
        return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))

    def _control(self, h):
        """The layer with only ``self.branches``: the others contribute zeros."""
        layer = self.attn
        cfg = layer.config
        kw = dict(config=cfg, implementation=layer.implementation, interpret=layer.interpret)
        q, k, v, g = layer.project(h)
        zeros = jnp.zeros(q.shape[:3] + (layer.v_head_dim,), q.dtype)
        o_c = o_s = o_w = zeros
        if "compressed" in self.branches or "selected" in self.branches:
            k_c, v_c = nsa_jax.compress(k, v, config=cfg, params=layer.compress_param_values())
            o, lse = nsa_jax.compressed_attention(q, k_c, v_c, **kw)
            o_c = o if "compressed" in self.branches else zeros
            if "selected" in self.branches:
                sel = nsa_jax.select_blocks(q, k_c, lse=lse, **kw)
                o_s = nsa_jax.selected_attention(q, k, v, sel, **kw)
        if "window" in self.branches:
            o_w = nsa_jax.sliding_window_attention(q, k, v, **kw)
        return layer.out(nsa_jax.gate_and_combine(o_c, o_s, o_w, g))


class RetrievalModel(nnx.Module):
    """Token embedding, NSA blocks, final norm and a projection to the vocabulary."""

    def __init__(self, vocab_size: int, cfg: DemoConfig, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, cfg.width, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = nnx.RMSNorm(cfg.width, rngs=rngs)
        self.head = nnx.Linear(cfg.width, vocab_size, rngs=rngs)

    def __call__(self, tokens):
        """tokens int32[B, T] -> logits float32[B, T, vocab]."""
        x = self.embed(tokens, out_sharding=_like_tokens(tokens))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def last_attention_input(self, tokens):
        """The normalised input [B, T, width] of the last block's NSA layer."""
        x = self.embed(tokens, out_sharding=_like_tokens(tokens))
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1].attn_norm(x)


def _like_tokens(tokens):
    """Activations [B, T, width] sharded as tokens [B, T] are (explicit mesh axes; data and
    context parallel), or None."""
    spec = tuple(jax.typeof(tokens).sharding.spec)
    return P(*spec, None) if any(spec) else None


def _replicated(x):
    """x on every device of the demo's mesh (to slice it freely); unchanged without one."""
    return x if jax.sharding.get_abstract_mesh().empty else jax.sharding.reshard(x, P())


def layer_selection(layer: nsa_jax.NSAAttention, x) -> nsa_jax.BlockSparseIndices:
    """The block selection ``layer`` makes for its input x [B, T, in_features] (its
    ``sow_selection``)."""
    _, sown = nnx.capture(layer, nnx.Intermediate)(x, sow_selection=True)
    (sel,) = sown["selection"].get_value()
    return sel


def _answer_loss(model, tokens, targets, answer):
    logits = model(tokens)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weight = answer.astype(jnp.float32)
    correct = (logits.argmax(-1) == targets).astype(jnp.float32)
    return (nll * weight).sum() / weight.sum(), (correct * weight).sum() / weight.sum()


@nnx.jit(static_argnums=(3, 4))
def _train_step(model, optimizer, key, task, batch_size):
    tokens, targets, answer = _place(*make_batch(key, task, batch_size)[:3])
    grad_fn = nnx.value_and_grad(_answer_loss, has_aux=True)
    (loss, acc), grads = grad_fn(model, tokens, targets, answer)
    optimizer.update(model, grads)
    return loss, acc


@nnx.jit(static_argnums=(2, 3))
def _evaluate(model, key, task, batch_size):
    """Held-out loss, accuracy, and the share of needle blocks in the query tiles' selections."""
    tokens, targets, answer, pair_pos = make_batch(key, task, batch_size)
    tokens, targets, answer = _place(tokens, targets, answer)
    loss, acc = _answer_loss(model, tokens, targets, answer)
    sel = layer_selection(model.blocks[-1].attn, model.last_attention_input(tokens))
    first = (task.seq_len - task.tail) // sel.q_tile
    picked = _replicated(sel.indices)[:, :, first:]  # [B, H, query tiles, k]
    needles = pair_pos // sel.block_size  # [B, P]
    hit = (picked[:, :, :, None, :] == needles[:, None, None, :, None]).any(-1)
    return loss, acc, hit.mean()


@nnx.jit
def _last_layer_selection(model, tokens):
    (tokens,) = _place(tokens)
    return layer_selection(model.blocks[-1].attn, model.last_attention_input(tokens))


def _plot_training(loss, acc, eval_acc: float, chance: float, path: str) -> None:
    steps = np.arange(1, len(loss) + 1)
    smooth = max(1, len(loss) // 30)
    kernel = np.ones(smooth) / smooth
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, series in ((ax_loss, loss), (ax_acc, acc)):
        ax.plot(steps, series, lw=0.6, alpha=0.4, color="C0")
        ax.plot(steps[smooth - 1:], np.convolve(series, kernel, "valid"), color="C0",
                label=f"training batch ({smooth}-step mean)")
    ax_loss.axhline(-np.log(chance), color="gray", ls=":",
                    label=f"chance: ln {round(1 / chance)} = {-np.log(chance):.2f}")
    ax_loss.set(xlabel="step", ylabel="cross-entropy at answer positions", yscale="log",
                title="training loss")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_acc.axhline(eval_acc, color="C2", ls="--", label=f"held out: {eval_acc:.1%}")
    ax_acc.axhline(chance, color="gray", ls=":", label=f"chance: {chance:.1%}")
    ax_acc.set(xlabel="step", ylabel="answer accuracy", ylim=(0, 1.02), title="accuracy")
    ax_acc.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_selection(sel: nsa_jax.BlockSparseIndices, pair_pos, task: RetrievalTask,
                    nsa: nsa_jax.NSAConfig, path: str) -> None:
    """Blocks selected per query tile (all tiles, then the query tiles per KV head); needles,
    forced blocks and the first query's window marked."""
    indices = np.asarray(sel.indices[0])  # [H, N_tiles, k]
    H, N_tiles, _ = indices.shape
    N_s = -(-task.seq_len // sel.block_size)
    window = nsa.window
    picked = np.zeros((H, N_tiles, N_s))
    for h, tile in np.ndindex(H, N_tiles):
        ids = indices[h, tile]
        picked[h, tile, ids[ids >= 0]] = 1.0
    first, last = selection.tile_span(jnp.arange(N_tiles) * sel.q_tile, sel.q_tile, task.seq_len,
                                      jnp.zeros((1,), jnp.int32))
    _, forced = selection.selection_masks(first, last, N_s, nsa, N_s)
    forced_tile, forced_block = np.nonzero(np.asarray(forced[0]))  # [N_tiles, N_s] cells
    needle_blocks = sorted({int(p) // sel.block_size for p in np.asarray(pair_pos)})
    query_tiles = list(range((task.seq_len - task.tail) // sel.q_tile, N_tiles))
    window_block = (task.seq_len - task.tail - window + 1) // sel.block_size
    query_rows = picked[:, query_tiles].transpose(1, 0, 2).reshape(-1, N_s)  # [(tile, head), N_s]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 10), sharex=True,
                                      height_ratios=[N_tiles, max(4, len(query_rows))])
    # The top panel counts the KV heads that chose a block: H + 1 values, one colour each.
    levels = matplotlib.colors.BoundaryNorm(np.arange(H + 2) - 0.5, H + 1)
    image = top.imshow(picked.sum(0), cmap=plt.get_cmap("Blues", H + 1), norm=levels,
                       aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, ax=[top, bottom], ticks=range(H + 1))
    bar.set_label(f"KV heads (of {H}) selecting the block")
    top.scatter(forced_block, forced_tile, marker=".", color="C1", s=4,
                label="forced block (initial or local)")
    top.scatter(needle_blocks, [-1.0] * len(needle_blocks), marker="v", color="C3", s=60,
                clip_on=False, label="block holding a needle")
    top.scatter([-1.0] * len(query_tiles), query_tiles, marker=">", color="C1", s=60,
                clip_on=False, label="tile of the query tokens")
    top.set(ylabel=f"query tile ({sel.q_tile} queries)", ylim=(N_tiles - 0.5, -1.5),
            title="blocks selected by the last NSA layer, one held-out sequence")
    bottom.imshow(query_rows, cmap=plt.get_cmap("Blues", 2), vmin=0, vmax=1, aspect="auto",
                  interpolation="nearest")
    bottom.set_yticks(range(len(query_rows)),
                      [f"tile {t}, KV head {h}" for t in query_tiles for h in range(H)])
    bottom.set(xlabel=f"KV block ({sel.block_size} keys)", xlim=(-1.5, N_s - 0.5),
               title="query tiles: red boxes are needle blocks, filled where selected")
    for row in range(len(query_rows)):
        for j in needle_blocks:
            bottom.add_patch(plt.Rectangle((j - 0.5, row - 0.5), 1, 1, fill=False, ec="C3", lw=2))
        tile_forced = forced_block[forced_tile == query_tiles[row // H]]
        bottom.scatter(tile_forced, [row] * len(tile_forced), marker=".", color="C1", s=30)
    top.set_yticks(range(0, N_tiles, -(-N_tiles // 8)))
    bottom.set_xticks(range(0, N_s, -(-N_s // 8)))
    for ax in (top, bottom):
        ax.axvline(window_block - 0.5, color="C1", ls=":", lw=1.2,
                   label=f"start of the first query's window ({window} keys)")
    handles, labels = top.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What `run` measured on held-out sequences, the wall time and where the plots went.

    Attributes:
      accuracy, loss: answer accuracy and cross-entropy.
      needle_recall: share of (sequence, KV head, query tile, needle) whose needle block the
        query tile selected.
      chance: accuracy of guessing, ``1 / num_values``.
      seconds: wall time of the whole run, compilation included.
      loss_png, selection_png: paths of the plots.
    """

    accuracy: float
    loss: float
    needle_recall: float
    chance: float
    seconds: float
    loss_png: str
    selection_png: str


def _schedule(cfg: DemoConfig):
    """AdamW's learning rate: 10% linear warmup (none under 10 steps), then cosine decay to a
    tenth."""
    warmup = cfg.steps // 10
    if warmup == 0:
        return optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps, alpha=0.1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.steps,
                                              cfg.learning_rate / 10)


def run(cfg: DemoConfig = DemoConfig(), out: str = "nsa_demo_out") -> DemoResult:
    """Trains the retrieval model, evaluates it on held-out sequences and writes the plots.

    Args:
      cfg: `DemoConfig`.
      out: directory for ``loss.png`` (training curves) and ``selection.png`` (selected blocks).

    Returns:
      `DemoResult`.
    """
    if cfg.devices > len(jax.devices()):
        raise ValueError(f"devices={cfg.devices}, but this process has {len(jax.devices())}; on "
                         f"a CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                         f"{cfg.devices} before jax starts (`nsa-jax demo --devices` does)")
    if cfg.devices == 1:
        return _run(cfg, out)
    data, seq = mesh_shape(cfg)
    mesh = jax.make_mesh((data, seq), ("data", "seq"), devices=jax.devices()[:cfg.devices],
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    print(f"mesh: {data} x {seq} devices (data x context parallel)")
    with jax.set_mesh(mesh):
        return _run(cfg, out)


def _run(cfg: DemoConfig, out: str) -> DemoResult:
    start = time.perf_counter()
    task = make_task(cfg)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); T={cfg.seq_len}, "
          f"batch={cfg.batch_size}, steps={cfg.steps}; {cfg.num_pairs} needles of {cfg.pair_len} "
          f"tokens in positions [{task.lo}, {task.hi}), {task.tail} queries from position "
          f"{cfg.seq_len - task.tail}, window={cfg.nsa.window}")

    init_key, train_key, eval_key = jax.random.split(jax.random.key(cfg.seed), 3)
    model = RetrievalModel(task.vocab_size, cfg, rngs=nnx.Rngs(init_key))
    optimizer = nnx.Optimizer(model, optax.adamw(_schedule(cfg), weight_decay=0.01),
                              wrt=nnx.Param)

    keys = jax.random.split(train_key, cfg.steps)
    print("compiling the training step ...", flush=True)
    tic = time.perf_counter()
    loss, acc = _train_step(model, optimizer, keys[0], task, cfg.batch_size)
    losses, accs = [float(loss)], [float(acc)]
    print(f"compiled and ran step 1 in {time.perf_counter() - tic:.1f} s", flush=True)
    with tqdm(keys[1:], desc="train", unit="step", initial=1, total=cfg.steps) as bar:
        for key in bar:
            loss, acc = _train_step(model, optimizer, key, task, cfg.batch_size)
            losses.append(float(loss))
            accs.append(float(acc))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.2f}")

    eval_keys = jax.random.split(eval_key, cfg.eval_batches)
    held_out = np.array([[float(x) for x in _evaluate(model, key, task, cfg.batch_size)]
                         for key in tqdm(eval_keys, desc="held-out", unit="batch")]).mean(0)
    eval_loss, eval_acc, recall = (float(x) for x in held_out)
    print("plotting ...", flush=True)

    os.makedirs(out, exist_ok=True)
    loss_png = os.path.join(out, "loss.png")
    selection_png = os.path.join(out, "selection.png")
    _plot_training(losses, accs, eval_acc, task.chance, loss_png)
    tokens, _, _, pair_pos = make_batch(eval_key, task, 1)
    _plot_selection(_last_layer_selection(model, tokens), pair_pos[0], task, cfg.nsa,
                    selection_png)
    return DemoResult(eval_acc, eval_loss, recall, task.chance, time.perf_counter() - start,
                      loss_png, selection_png)
