"""Backend-neutral pieces of the NSA kernels: the token mask rule, block metadata and row layout.

The token rule (`MaskRule`): key index j sits at position ``j * key_stride + key_offset`` (stride
1, offset 0 for raw keys; stride d, offset l - 1 for compressed tokens, whose position is their
last key), is valid for ``j < num_keys``, and is visible to a query at position p when it is
causal-visible (position <= p) and inside the window (p - position < w, or |p - position| < w
non-causal). Packed rows add per-row bounds: row r sees only key indices lo[r] <= j < hi[r] (its
document). `block_range`, `full_range` and `query_range` turn the rule into block and tile ranges.

The row layout (`Launch`): a program owns one (batch, KV head, query tile). Its rows are the
tile's queries times the G query heads of that KV head (row r is query r // G_p, head r % G_p), so
every KV block is loaded once for the whole group. `Launch` pads and reshapes the inputs into that
layout and the outputs back; `Program` is what a kernel body knows statically.

`BlockTable` and `ReverseTable` carry the block-sparse metadata a kernel walks (see
docs/design.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Bound of rows past T: beyond every key, so they see nothing, and the bounds stay non-decreasing.
FAR = 2 ** 30


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def compute_major(device) -> str:
    """The major compute capability of a GPU device ("9" on Hopper), "" for other devices."""
    return str(getattr(device, "compute_capability", "") or "").split(".")[0]


def no_keys(q, v):
    """(o, lse) of attention with nothing to attend to: zeros [B, T, HQ, Dv] in q.dtype and -inf
    [B, T, HQ] float32."""
    B, T, HQ, _ = q.shape
    return (jnp.zeros((B, T, HQ, v.shape[3]), q.dtype),
            jnp.full((B, T, HQ), -jnp.inf, jnp.float32))


def check_launch_fields(config, pow2_minimums: dict[str, int]) -> None:
    """Each named field a power of two >= its minimum, ``num_stages`` a positive int."""
    cls = type(config).__name__
    for name, minimum in pow2_minimums.items():
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum or v & (v - 1):
            raise ValueError(f"{cls}.{name}={v!r} must be a power of two >= {minimum}")
    stages = config.num_stages
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ValueError(f"{cls}.num_stages={stages!r} must be a positive int")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MaskRule:
    """Static token-level rule (see the module docstring)."""

    num_keys: int
    key_stride: int = 1
    key_offset: int = 0
    causal: bool = True
    window: int = 0  # 0: no window limit


def visible(rule: MaskRule, q_pos, start, block_k: int, bounds=None):
    """bool [rows, BK]: which keys ``start .. start + BK - 1`` each row (at ``q_pos``, within its
    ``bounds`` = (lo, hi) [rows] if given) may see."""
    j = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    k_pos = j * rule.key_stride + rule.key_offset  # [BK]
    diff = q_pos[:, None] - k_pos[None, :]  # [rows, BK]
    ok = (j < rule.num_keys)[None, :]
    if rule.causal:
        ok = ok & (diff >= 0)
        if rule.window:
            ok = ok & (diff < rule.window)
    elif rule.window:
        ok = ok & (jnp.abs(diff) < rule.window)
    if bounds is not None:
        lo, hi = bounds
        ok = ok & (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])
    return ok


def block_range(rule: MaskRule, first, last, block_k: int):
    """[lo, hi) of the KV blocks holding keys visible to some query at positions first..last."""
    if rule.causal:
        hi_key = (last - rule.key_offset) // rule.key_stride + 1
    elif rule.window:
        hi_key = (last + rule.window - 1 - rule.key_offset) // rule.key_stride + 1
    else:
        hi_key = rule.num_keys
    lo_key = (first - rule.window + 1 - rule.key_offset) // rule.key_stride if rule.window else 0
    lo = jnp.maximum(lo_key, 0) // block_k
    hi = (jnp.minimum(jnp.maximum(hi_key, 0), rule.num_keys) + block_k - 1) // block_k
    return lo, jnp.maximum(hi, lo)


def full_range(rule: MaskRule, first, last, lo, hi, block_k: int):
    """[flo, fhi) inside [lo, hi): the KV blocks every query at positions first..last sees whole,
    so their scores need no mask."""
    stride, off = rule.key_stride, rule.key_offset
    top = first if rule.causal else (first + rule.window - 1 if rule.window else None)
    if top is None:
        n_full = jnp.int32(rule.num_keys)
    else:  # keys j with j * stride + off <= top
        n_full = jnp.clip(jnp.maximum(top - off, -1) // stride + 1, 0, rule.num_keys)
    fhi = n_full // block_k
    if rule.window:  # keys j with j * stride + off > last - w
        lo_key = jnp.maximum(-((off + rule.window - 1 - last) // stride), 0)
        flo = (lo_key + block_k - 1) // block_k
    else:
        flo = lo
    flo = jnp.clip(flo, lo, hi)
    return flo, jnp.clip(fhi, flo, hi)


def bounded_ranges(rule: MaskRule, first, last, block_k: int, bounds=None):
    """(lo, hi, flo, fhi): `block_range` and `full_range` of queries first..last, narrowed to the
    rows' ``bounds`` = (lo, hi) [rows] when given."""
    lo, hi = block_range(rule, first, last, block_k)
    flo, fhi = full_range(rule, first, last, lo, hi, block_k)
    if bounds is not None:
        # Stay inside the rule's [lo, hi): rows past T carry far-away bounds, and callers clear
        # the blocks outside the range.
        b_lo, b_hi = bounds
        lo = jnp.clip(jnp.min(b_lo) // block_k, lo, hi)
        hi = jnp.clip((jnp.max(b_hi) + block_k - 1) // block_k, lo, hi)
        flo = jnp.clip(jnp.maximum(flo, (jnp.max(b_lo) + block_k - 1) // block_k), lo, hi)
        fhi = jnp.clip(jnp.minimum(fhi, jnp.min(b_hi) // block_k), flo, hi)
    return lo, hi, flo, fhi


def walk_range(rule: MaskRule, first, last, block_k: int, visit, carry, bounds=None, part=None):
    """Runs ``carry = visit(blk, carry, masked)`` over the blocks that queries first..last (within
    ``bounds``) can see, with ``masked=False`` (static) for the blocks they all see whole.
    ``part`` = (s, n): only the s-th of n consecutive equal shares of those blocks."""
    lo, hi, flo, fhi = bounded_ranges(rule, first, last, block_k, bounds)
    if part is not None:
        lo, hi = share_of(lo, hi, *part)
        flo, fhi = jnp.clip(flo, lo, hi), jnp.clip(fhi, lo, hi)
    carry = lax.fori_loop(lo, flo, functools.partial(visit, masked=True), carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(visit, masked=False), carry)
    return lax.fori_loop(fhi, hi, functools.partial(visit, masked=True), carry)


def share_of(lo, hi, s, n: int):
    """[lo_s, hi_s): the s-th of n consecutive equal shares of the range [lo, hi)."""
    per = (hi - lo + n - 1) // n
    lo_s = jnp.minimum(lo + s * per, hi)
    return lo_s, jnp.clip(lo + (s + 1) * per, lo_s, hi)


def query_range(rule: MaskRule, k_start, block_k: int, offset, block_q: int, n_qt: int):
    """[ilo, ihi): the query tiles (of ``block_q`` queries, query 0 at key position ``offset``)
    with some query that sees a key of the block starting at key index ``k_start``."""
    j_hi = jnp.minimum(k_start + block_k, rule.num_keys) - 1
    kp_lo = k_start * rule.key_stride + rule.key_offset
    kp_hi = j_hi * rule.key_stride + rule.key_offset
    w = rule.window
    if rule.causal:
        p_lo, p_hi = kp_lo, (kp_hi + w - 1 if w else None)
    else:
        p_lo, p_hi = (kp_lo - w + 1, kp_hi + w - 1) if w else (None, None)
    ilo = jnp.int32(0) if p_lo is None else jnp.clip((p_lo - offset) // block_q, 0, n_qt)
    ihi = jnp.int32(n_qt) if p_hi is None else jnp.clip((p_hi - offset) // block_q + 1, 0, n_qt)
    return ilo, jnp.where(j_hi < k_start, ilo, jnp.maximum(ihi, ilo))


def bounded_query_tiles(bounds, block_k: int, n_kb: int, block_q: int):
    """Packed rows: (ilo, ihi) int32 [B, n_kb], the query tiles with a row whose bounds (lo, hi)
    [B, T] (non-decreasing) meet each KV block."""
    lo, hi = bounds
    j0 = jnp.arange(n_kb, dtype=jnp.int32) * block_k
    first = jax.vmap(lambda h: jnp.searchsorted(h, j0, side="right"))(hi)  # first row with hi > j0
    end = jax.vmap(lambda l: jnp.searchsorted(l, j0 + block_k, side="left"))(lo)  # lo >= j1
    ilo = (first // block_q).astype(jnp.int32)
    return ilo, jnp.maximum(-(-end // block_q), ilo).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockTable:
    """The KV blocks each query tile walks.

    Attributes:
      table: int32 [B, H, N_tiles, K], KV block ids sorted ascending, -1 after ``counts``.
      counts: int32 [B, H, N_tiles], valid entries per row.
      q_tile: queries per table row; static, a multiple of the kernel's ``block_q``.
    """

    table: jax.Array
    counts: jax.Array
    q_tile: int = dataclasses.field(metadata=dict(static=True))

    def tiles_per_row(self, block_q: int) -> int:
        """Query tiles of ``block_q`` queries per table row."""
        if self.q_tile % block_q:
            raise ValueError(
                f"table query tile {self.q_tile} must be a multiple of block_q={block_q}")
        return self.q_tile // block_q


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReverseTable:
    """For each KV block, the table rows that list it (`nsa_jax.metadata.reverse_map` of a
    `BlockTable`), so dK/dV programs own whole blocks and need no atomics.

    Attributes:
      tiles: int32 [B, H, N_tiles * K], table rows grouped by KV block, -1 after the last.
      offsets: int32 [B, H, N_kv + 1]; block j owns ``tiles[..., offsets[j]:offsets[j + 1]]``.
    """

    tiles: jax.Array
    offsets: jax.Array


def table_inputs(blocks: BlockTable | None, block_q: int, splits: int = 1):
    """(specs, args) giving program i (query tile i // splits) its table row (padded to a power
    of two with -1) and that row's count; (None, None) without a table."""
    if blocks is None:
        return None, None
    per = blocks.tiles_per_row(block_q) * splits
    K = blocks.table.shape[-1]
    K_p = pow2(K)
    tab = jnp.pad(blocks.table, ((0, 0), (0, 0), (0, 0), (0, K_p - K)), constant_values=-1)
    specs = (pl.BlockSpec((None, None, None, K_p), lambda b, h, i: (b, h, i // per, 0)),
             pl.BlockSpec((None, None, None, 1), lambda b, h, i: (b, h, i // per, 0)))
    return specs, (tab, blocks.counts[..., None])


def group_lse(lse, H: int, T_p: int, G_p: int):
    """float32 [B, T, H*G] log-sum-exp -> [B, H, T_p * G_p], +inf for rows without a visible key
    (lse = -inf) and for padded rows, so that their probabilities are exactly 0."""
    T, HQ = lse.shape[1:]
    finite = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    lse_g = group_rows(finite[..., None], H, T_p, G_p, 1)[..., 0]
    row = jnp.arange(T_p * G_p)
    real = ((row // G_p) < T) & ((row % G_p) < HQ // H)
    return jnp.where(real, lse_g, jnp.inf)


def group_rows(x, H: int, T_p: int, G_p: int, D_p: int):
    """[B, T, H*G, D] -> [B, H, T_p * G_p, D_p], zero padded; row r is query r // G_p, head r % G_p,
    so the rows of one program are contiguous."""
    B, T, HQ, D = x.shape
    G = HQ // H
    x = x.reshape(B, T, H, G, D).transpose(0, 2, 1, 3, 4)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, T_p - T), (0, G_p - G), (0, D_p - D)))
    return x.reshape(B, H, T_p * G_p, D_p)


def heads_major(x, N_p: int, D_p: int):
    """[B, N, H, D] -> [B, H, N_p, D_p], zero padded."""
    N, D = x.shape[1], x.shape[3]
    return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, N_p - N), (0, D_p - D)))


def bound_rows(bounds, T_p: int, G_p: int):
    """(lo, hi) int32 [B, T] per query -> [B, T_p * G_p] per row (row r is query r // G_p);
    padded queries see nothing."""
    return tuple(jnp.repeat(jnp.pad(x.astype(jnp.int32), ((0, 0), (0, T_p - x.shape[1])),
                                    constant_values=FAR), G_p, axis=1) for x in bounds)


def read_bounds(refs):
    """The rows' (lo, hi) from their refs, or None."""
    return None if refs is None else (refs[0][...], refs[1][...])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Program:
    """What a kernel body knows statically: the mask rule, the softmax scale and its tile.

    Attributes:
      rule: the token-level mask rule.
      scale: softmax scale.
      group: rows per query (the padded group G_p).
      block_q: queries per query tile; block_k: keys per KV block.
      num_q_tiles, num_kv_blocks: of the whole launch.
    """

    rule: MaskRule
    scale: float
    group: int
    block_q: int
    block_k: int
    num_q_tiles: int
    num_kv_blocks: int

    @property
    def rows(self) -> int:
        return self.block_q * self.group

    @property
    def scale2(self) -> float:
        """The scale of scores in log2 units: exp2 is one instruction, exp is a library call."""
        return self.scale * LOG2E

    def q_pos(self, first):
        """int32 [rows]: the position of each row of the tile whose first query is at ``first``."""
        return first + lax.broadcasted_iota(jnp.int32, (self.rows,), 0) // self.group

    def start(self, blk):
        """Key index of KV block ``blk``'s first key."""
        return pl.multiple_of(blk * self.block_k, self.block_k)

    def visible(self, q_pos, start, bounds=None):
        return visible(self.rule, q_pos, start, self.block_k, bounds)

    def walk(self, first, visit, carry, *, blocks=None, bounds=None, part=None):
        """Runs ``carry = visit(blk, carry, masked=...)`` over the KV blocks of the tile whose first
        query is at ``first``: its table row when ``blocks`` = (table ref, count ref) is given
        (all masked), else the range of `walk_range`; ``part`` = (s, n): only the s-th of n
        consecutive equal shares of those blocks."""
        if blocks is None:
            return walk_range(self.rule, first, first + self.block_q - 1, self.block_k, visit,
                              carry, bounds, part)
        tab_ref, cnt_ref = blocks
        lo, hi = jnp.int32(0), cnt_ref[0]
        if part is not None:
            lo, hi = share_of(lo, hi, *part)
        return lax.fori_loop(lo, hi, lambda e, carry: visit(tab_ref[e], carry), carry)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Launch:
    """Static shapes of one grouped launch, computed once by `Launch.of`.

    Attributes:
      B, T, H, G, N, D, Dv: the unpadded sizes (G query heads per KV head, N keys).
      block_q, block_k: queries per query tile, keys per KV block.
      G_p: G padded to a power of two, and further so a program has at least 16 rows.
      T_p: T padded to a multiple of the query unit; N_p: N to a multiple of block_k.
      D_p, Dv_p: D and Dv padded to powers of two >= 16.
    """

    B: int
    T: int
    H: int
    G: int
    N: int
    D: int
    Dv: int
    block_q: int
    block_k: int
    G_p: int
    T_p: int
    N_p: int
    D_p: int
    Dv_p: int

    @classmethod
    def of(cls, q, k, v=None, *, block_q: int, block_k: int, q_unit: int | None = None) -> Launch:
        """The launch of q [B, T, H*G, D] against k [B, N, H, D] (and v [B, N, H, Dv]); T is padded
        to a multiple of ``q_unit`` (default block_q; a multiple of it)."""
        B, T, HQ, D = q.shape
        N, H = k.shape[1], k.shape[2]
        Dv = D if v is None else v.shape[3]
        G = HQ // H
        G_p = pow2(G)
        if block_q * G_p < 16:  # tl.dot needs at least 16 rows: pad the group with zero heads
            G_p = 16 // block_q
        unit = block_q if q_unit is None else q_unit
        return cls(B=B, T=T, H=H, G=G, N=N, D=D, Dv=Dv, block_q=block_q, block_k=block_k,
                   G_p=G_p, T_p=-(-T // unit) * unit, N_p=-(-N // block_k) * block_k,
                   D_p=max(16, pow2(D)), Dv_p=max(16, pow2(Dv)))

    @property
    def rows(self) -> int:
        """Rows per program."""
        return self.block_q * self.G_p

    @property
    def num_q_tiles(self) -> int:
        return self.T_p // self.block_q

    @property
    def num_kv_blocks(self) -> int:
        return self.N_p // self.block_k

    def program(self, rule: MaskRule, scale: float) -> Program:
        return Program(rule=rule, scale=scale, group=self.G_p, block_q=self.block_q,
                       block_k=self.block_k, num_q_tiles=self.num_q_tiles,
                       num_kv_blocks=self.num_kv_blocks)

    def group(self, x, width: int):
        """[B, T, H*G, w] -> [B, H, T_p * G_p, width], zero padded (see `group_rows`)."""
        return group_rows(x, self.H, self.T_p, self.G_p, width)

    def group_vector(self, x):
        """[B, T, H*G] -> [B, H, T_p * G_p], zero padded."""
        return self.group(x[..., None], 1)[..., 0]

    def group_lse(self, lse):
        """`group_lse` in this launch's layout."""
        return group_lse(lse, self.H, self.T_p, self.G_p)

    def ungroup(self, x, width: int):
        """[B, H, T_p * G_p, w_p] -> [B, T, H*G, width]: drops padded rows, heads and channels."""
        x = x.reshape(self.B, self.H, self.T_p, self.G_p, x.shape[-1])
        x = x[:, :, :self.T, :self.G, :width].transpose(0, 2, 1, 3, 4)
        return x.reshape(self.B, self.T, self.H * self.G, width)

    def ungroup_vector(self, x):
        """[B, H, T_p * G_p] -> [B, T, H*G]."""
        x = x.reshape(self.B, self.H, self.T_p, self.G_p)[:, :, :self.T, :self.G]
        return x.transpose(0, 2, 1, 3).reshape(self.B, self.T, self.H * self.G)

    def heads_major(self, x, width: int):
        """[B, N, H, w] -> [B, H, N_p, width], zero padded."""
        return heads_major(x, self.N_p, width)

    def seq_major(self, x, width: int):
        """[B, H, N_p, w_p] -> [B, N, H, width]."""
        return x[:, :, :self.N, :width].transpose(0, 2, 1, 3)

    def rows_shape(self, dtype, width: int | None = None):
        """Shape and dtype of a grouped output [B, H, T_p * G_p(, width)]."""
        tail = () if width is None else (width,)
        return jax.ShapeDtypeStruct((self.B, self.H, self.T_p * self.G_p, *tail), dtype)

    def tile_spec(self, width: int | None = None):
        """BlockSpec of program (b, h, i)'s rows of a grouped array (of ``width`` channels)."""
        if width is None:
            return pl.BlockSpec((None, None, self.rows), lambda b, h, i: (b, h, i))
        return pl.BlockSpec((None, None, self.rows, width), lambda b, h, i: (b, h, i, 0))

    def all_rows_spec(self, width: int | None = None):
        """BlockSpec of all rows of (b, h) of a grouped array."""
        n = self.T_p * self.G_p
        if width is None:
            return pl.BlockSpec((None, None, n), lambda b, h, i: (b, h, 0))
        return pl.BlockSpec((None, None, n, width), lambda b, h, i: (b, h, 0, 0))

    def kv_spec(self, width: int):
        """BlockSpec of all keys of (b, h) of a heads-major array."""
        return pl.BlockSpec((None, None, self.N_p, width), lambda b, h, i: (b, h, 0, 0))

    def keys(self, x, width: int):
        """(BlockSpec, operand) of all keys of (b, h) in x [B, N, H, w]: x itself when it needs
        no padding (a program reads its head's rows in place, strided), else `heads_major`'s
        padded copy. A decode step over a long cache must not copy the cache."""
        if x.shape[1] == self.N_p and x.shape[3] == width:
            return pl.BlockSpec((None, self.N_p, None, width), lambda b, h, i: (b, 0, h, 0)), x
        return self.kv_spec(width), self.heads_major(x, width)

    def bound_inputs(self, bounds, *, all_rows: bool = False, splits: int = 1):
        """(specs, args) of the rows' (lo, hi) from `bound_rows`: the rows of program (b, h, i)
        (query tile i // splits), or all rows of batch b; (None, None) without bounds."""
        if bounds is None:
            return None, None
        if all_rows:
            spec = pl.BlockSpec((None, self.T_p * self.G_p), lambda b, h, i: (b, 0))
        else:
            spec = pl.BlockSpec((None, self.rows), lambda b, h, i: (b, i // splits))
        return (spec, spec), bound_rows(bounds, self.T_p, self.G_p)
