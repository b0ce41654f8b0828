"""One flash-attention forward core for all three NSA branches (Pallas, Triton lowering).

A program owns one (batch, KV head, query tile). Its rows are the tile's queries times the G query
heads of that KV head (row r is query r // G, head r % G), so every KV block is loaded once for
the whole group. It walks either a list of KV blocks (block-sparse metadata) or a contiguous
range derived from its query positions, masks each score with a token-level rule, and keeps the
softmax statistics in float32.

The token rule: key index j sits at position ``j * key_stride + key_offset`` (stride 1, offset 0
for raw keys; stride d, offset l - 1 for compressed tokens, whose position is their last key), is
valid for ``j < num_keys``, and is visible to a query at position p when it is causal-visible
(position <= p) and inside the window (p - position < w, or |p - position| < w non-causal).
Packed rows add per-row bounds: row r sees only key indices lo[r] <= j < hi[r] (its document).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlashConfig:
    """Tiling of the forward core; not semantics.

    Attributes:
      block_q: queries per program (power of two); rows per program are block_q * G_pad.
      block_k: keys per KV block (power of two, >= 16).
      num_warps, num_stages: Triton launch parameters.
    """

    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_launch_fields(self, {"block_q": 1, "block_k": 16, "num_warps": 1})


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


def walk_range(rule: MaskRule, first, last, block_k: int, visit, carry, bounds=None):
    """Runs ``carry = visit(blk, carry, masked)`` over the blocks that queries first..last (within
    ``bounds``) can see, with ``masked=False`` (static) for the blocks they all see whole."""
    lo, hi, flo, fhi = bounded_ranges(rule, first, last, block_k, bounds)
    carry = lax.fori_loop(lo, flo, functools.partial(visit, masked=True), carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(visit, masked=False), carry)
    return lax.fori_loop(fhi, hi, functools.partial(visit, masked=True), carry)


def _kernel(*refs, rule: MaskRule, scale: float, G: int, block_q: int, block_k: int,
            use_table: bool, bounded: bool):
    refs, bounds = split_bounds(refs, bounded, 2)
    if use_table:
        off_ref, tab_ref, cnt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    else:
        off_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    b, i = pl.program_id(0), pl.program_id(2)
    rows = q_ref.shape[0]
    q = q_ref[...]  # [rows, D]
    # float32 inputs get float32 products; Triton would otherwise use TF32.
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    first = off_ref[b] + i * block_q
    q_pos = first + lax.broadcasted_iota(jnp.int32, (rows,), 0) // G  # [rows]
    Dv = v_ref.shape[-1]
    # Scores in log2 units: exp2 is one instruction, exp is a libdevice call.
    scale2 = scale * LOG2E

    def visit(blk, carry, masked=True):
        acc, m, l = carry  # [rows, Dv], [rows], [rows]; m in log2 units
        start = pl.multiple_of(blk * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]  # [BK, D]
        v = v_ref[pl.ds(start, block_k), :]  # [BK, Dv]
        s = pltriton.dot(q, k, trans_b=True, precision=prec).astype(jnp.float32) * scale2  # [rows, BK]
        if masked:
            s = jnp.where(visible(rule, q_pos, start, block_k, bounds), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])  # [rows, BK]
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + pltriton.dot(p.astype(v.dtype), v, precision=prec).astype(jnp.float32)
        return acc, m_new, l

    init = (jnp.zeros((rows, Dv), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    if use_table:
        def body(e, carry):
            return visit(tab_ref[e], carry)
        acc, m, l = lax.fori_loop(0, cnt_ref[0], body, init)
    else:
        acc, m, l = walk_range(rule, first, first + block_q - 1, block_k, visit, init, bounds)
    has_key = l > 0
    l_safe = jnp.where(has_key, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_key, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)


def split_bounds(refs, bounded: bool, n_outputs: int):
    """Kernel refs -> (the others, (lo, hi) row vectors or None): bound refs come last among the
    inputs, just before the ``n_outputs`` output refs."""
    if not bounded:
        return refs, None
    cut = len(refs) - n_outputs
    return refs[:cut - 2] + refs[cut:], (refs[cut - 2][...], refs[cut - 1][...])


# Bound of rows past T: beyond every key, so they see nothing, and the bounds stay non-decreasing.
FAR = 2 ** 30


def bound_rows(bounds, T_p: int, G_p: int):
    """(lo, hi) int32 [B, T] per query -> [B, T_p * G_p] per row (row r is query r // G_p);
    padded queries see nothing."""
    return tuple(jnp.repeat(jnp.pad(x.astype(jnp.int32), ((0, 0), (0, T_p - x.shape[1])),
                                    constant_values=FAR), G_p, axis=1) for x in bounds)


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


def table_inputs(table, counts, per: int):
    """Specs and arrays giving the program of query tile i its selection tile's row (i // per) of
    the block table (padded to a power of two with -1) and its count."""
    K = table.shape[-1]
    K_p = pow2(K)
    tab = jnp.pad(table, ((0, 0), (0, 0), (0, 0), (0, K_p - K)), constant_values=-1)
    specs = [pl.BlockSpec((None, None, None, K_p), lambda b, h, i: (b, h, i // per, 0)),
             pl.BlockSpec((None, None, None, 1), lambda b, h, i: (b, h, i // per, 0))]
    return specs, [tab, counts[..., None]]


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def flash_forward(q, k, v, offsets, *, rule: MaskRule, scale: float, config: FlashConfig,
                  table=None, counts=None, table_q_tile: int = 1, bounds=None,
                  interpret: bool = False):
    """Grouped flash attention over a block list or a block range.

    Args:
      q: [B, T, HQ, D]; k: [B, N, H, D]; v: [B, N, H, Dv] (N keys or compressed tokens).
      offsets: int32[B], key position of query 0 (S - T).
      rule: the token-level mask rule.
      scale: softmax scale.
      config: tiling; ``config.block_k`` is the KV block the table ids refer to.
      table, counts: optional int32[B, H, N_tiles, K] sorted KV block ids (-1 padded) and
        int32[B, H, N_tiles]; query tile ``table_q_tile`` (a multiple of ``config.block_q``).
        Without them each program walks the range of blocks its rule can see.
      bounds: optional (lo, hi) int32 [B, T]: query t sees only keys lo[t] <= j < hi[t] (packed
        rows); both non-decreasing in t.

    Returns:
      o [B, T, HQ, Dv] in q.dtype and lse [B, T, HQ] float32 (-inf for rows without a key).
    """
    B, T, HQ, D = q.shape
    N, H, Dv = k.shape[1], k.shape[2], v.shape[3]
    if N == 0 or T == 0:
        return jnp.zeros((B, T, HQ, Dv), q.dtype), jnp.full((B, T, HQ), -jnp.inf, jnp.float32)
    G = HQ // H
    bq, bk = config.block_q, config.block_k
    G_p, D_p, Dv_p = pow2(G), max(16, pow2(D)), max(16, pow2(Dv))
    if table is not None and table_q_tile % bq:
        raise ValueError(f"table query tile {table_q_tile} must be a multiple of block_q={bq}")
    if bq * G_p < 16:  # tl.dot needs at least 16 rows: pad the group with zero heads
        G_p = 16 // bq
    rows = bq * G_p
    n_qt = -(-T // bq)
    n_kb = -(-N // bk)
    qg = group_rows(q, H, n_qt * bq, G_p, D_p)
    kh, vh = heads_major(k, n_kb * bk, D_p), heads_major(v, n_kb * bk, Dv_p)
    in_specs = [pl.BlockSpec((None, None, rows, D_p), lambda b, h, i: (b, h, i, 0)),
                pl.BlockSpec((None, None, n_kb * bk, D_p), lambda b, h, i: (b, h, 0, 0)),
                pl.BlockSpec((None, None, n_kb * bk, Dv_p), lambda b, h, i: (b, h, 0, 0))]
    args = [qg, kh, vh]
    if table is not None:
        specs, table_args = table_inputs(table, counts, table_q_tile // bq)
        in_specs, args = specs + in_specs, table_args + args
    if bounds is not None:
        in_specs += [pl.BlockSpec((None, rows), lambda b, h, i: (b, i))] * 2
        args += list(bound_rows(bounds, n_qt * bq, G_p))
    kernel = functools.partial(_kernel, rule=rule, scale=scale, G=G_p, block_q=bq, block_k=bk,
                               use_table=table is not None, bounded=bounds is not None)
    o, lse = pl.pallas_call(
        kernel,
        grid=(B, H, n_qt),
        in_specs=[pl.BlockSpec()] + in_specs,
        out_specs=[pl.BlockSpec((None, None, rows, Dv_p), lambda b, h, i: (b, h, i, 0)),
                   pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct((B, H, n_qt * rows, Dv_p), q.dtype),
                   jax.ShapeDtypeStruct((B, H, n_qt * rows), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps,
                                                num_stages=config.num_stages),
        interpret=interpret,
        name="nsa_flash_fwd",
    )(offsets.astype(jnp.int32), *args)
    o = o.reshape(B, H, n_qt * bq, G_p, Dv_p)[:, :, :T, :G, :Dv].transpose(0, 2, 1, 3, 4)
    lse = lse.reshape(B, H, n_qt * bq, G_p)[:, :, :T, :G].transpose(0, 2, 1, 3)
    return o.reshape(B, T, HQ, Dv), lse.reshape(B, T, HQ)
