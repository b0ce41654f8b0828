"""Block selection kernels (Triton lowering): rules and top-n on chip.

`tile_top_blocks` chooses from block scores already made (a decode step's, from
`scored_block_mass`): one program per (row, KV head, tile) applies the rules and takes the best
block n times. `per_token_top_blocks` computes the scores as well, as follows.

With ``select_q_tile = 1`` every query chooses its own n blocks. A program owns ``block_q``
queries of one KV head (rows = queries x the G heads, as in the forward) and walks the compressed
tokens in chunks of ``BK`` tokens, i.e. ``NB = BK / (l' / d)`` whole selection blocks:

1. the probabilities of its rows from the compressed branch's log-sum-exp ``[rows, BK]``;
2. block scores ``[rows, NB]`` through the fixed banded token -> block matrix on the matrix
   units. That matrix holds multiples of 1 / r (r = l / d), exact in bfloat16, so the float32
   probabilities go in as three bfloat16 parts and the product keeps float32 accuracy;
3. the sum over the G heads of each query ``[block_q, NB]``; the tail of the chunk's last tokens
   that falls into the next chunk's first block is carried over;
4. eligibility and forced blocks, then a running top-n per query: candidates that beat the
   current n-th best replace it, best first, until none does. Once the list is full that is a
   round or two per chunk. (Merging by counting ranks, every entry against every other, has no
   loop but measured 1.06x to 2.4x slower on an H200.)

Only the chosen ids, ``int32[B, H, T, n]``, reach memory; no ``[T, N_c]`` or ``[T, N_s]`` array
is formed. Ties go to the lower block id, forced blocks rank above every scored block and the
query's own block above the other forced ones, as in `nsa_jax.ops.selection.top_blocks`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nsa_jax.kernels.common import (FAR, LOG2E, Launch, MaskRule, Program, bounded_ranges, pow2,
                                    read_bounds)
from nsa_jax.kernels.triton.block_map import exact_dot, token_map
from nsa_jax.kernels.triton.flash_bwd import probabilities
from nsa_jax.kernels.triton.flash_fwd import FlashConfig, dot_precision

_NONE = -1
_MAX = float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockRule:
    """Static selection rule of the kernel (the fields of `nsa_jax.NSAConfig` it needs).

    Attributes:
      select_block: keys per selection block (l').
      per_block: compressed strides per selection block (l' / d).
      overlap: strides covered by one compressed token (r = l / d).
      num_selected, num_initial, num_local, causal: as in `NSAConfig`.
    """

    select_block: int
    per_block: int
    overlap: int
    num_selected: int
    num_initial: int
    num_local: int
    causal: bool

    def fused(self) -> str | None:
        """Why this rule cannot run in the fused kernel, or None."""
        pb = self.per_block
        if pb & (pb - 1):
            return f"select_block / compress_stride = {pb} is not a power of two"
        if self.overlap - 1 > pb:
            return (f"a compressed token spans {self.overlap} strides, more than one selection "
                    f"block ({pb}) past its own")
        return None

    def chunk(self, block_k: int) -> int:
        """Compressed tokens per chunk: whole blocks, and at least 16 blocks for `tl.dot`."""
        return max(block_k, 16 * self.per_block)


def _rule_keys(s, j, lo, last, own_lo, own_hi, rule: BlockRule):
    """Selection keys of blocks ``j`` with scores ``s`` (broadcast together) for a query or tile
    whose sequence starts at block ``lo``, that may take blocks up to ``last`` and whose own
    queries sit in blocks ``own_lo .. own_hi``: -inf where not eligible, the float32 maximum for
    forced blocks and +inf for its own forced ones, as `nsa_jax.ops.selection.top_blocks` ranks
    them."""
    eligible = (j >= lo) & (j <= last)
    forced = j < lo + rule.num_initial
    if rule.num_local >= 1:
        forced |= (j >= own_lo - (rule.num_local - 1)) & (j <= own_hi)
    forced &= eligible
    key = jnp.where(eligible, s, -jnp.inf)
    key = jnp.where(forced, _MAX, key)
    return jnp.where(forced & (j >= own_lo) & (j <= own_hi), jnp.inf, key)


def _insert(best, ids, key, blk, n: int):
    """Running top-n: moves the candidates ``key`` [Q, NB] (block ids ``blk`` [NB]) that beat the
    n-th best of ``best``/``ids`` [Q, NP] into it, best first; ties to the lower id."""
    slot = lax.broadcasted_iota(jnp.int32, best.shape, 1)
    live = slot < n

    def worst(best, ids):
        # The slot to give up: lowest key, and the highest id among equal keys.
        b = jnp.where(live, best, jnp.inf)
        floor = jnp.min(b, axis=1)  # [Q]
        tie = b == floor[:, None]
        top_id = jnp.max(jnp.where(tie, ids, _NONE - 1), axis=1)
        at = jnp.min(jnp.where(tie & (ids == top_id[:, None]), slot, best.shape[1]), axis=1)
        return floor, at

    def pending(state):
        best, ids, key = state
        floor, _ = worst(best, ids)
        return jnp.max((jnp.max(key, axis=1) > floor).astype(jnp.int32)) > 0

    def step(state):
        best, ids, key = state
        floor, at = worst(best, ids)
        top = jnp.max(key, axis=1)  # [Q]
        top_id = jnp.min(jnp.where(key == top[:, None], blk[None, :], FAR), axis=1)
        put = (top > floor)[:, None] & (slot == at[:, None])
        best = jnp.where(put, top[:, None], best)
        ids = jnp.where(put, top_id[:, None], ids)
        # Candidates are visited in block order, so one that does not beat the floor now never
        # will (the floor only rises and every listed id is lower): drop it either way.
        key = jnp.where(blk[None, :] == top_id[:, None], -jnp.inf, key)
        return best, ids, key

    best, ids, _ = lax.while_loop(pending, step, (best, ids, key))
    return best, ids


def _kernel(off_ref, lse_ref, q_ref, k_ref, lo_ref, hi_ref, bounds, out_ref, *, prog: Program,
            rule: BlockRule, n_p: int):
    b, i = pl.program_id(0), pl.program_id(2)
    q = q_ref[...]  # [rows, D]
    lse2 = lse_ref[...] * LOG2E  # [rows]; +inf for rows that must not count
    prec = dot_precision(q.dtype)
    bq, G, BK = prog.block_q, prog.group, prog.block_k
    NB = BK // rule.per_block
    first = off_ref[b] + i * bq
    q_pos = prog.q_pos(first)  # [rows]
    pos = first + lax.broadcasted_iota(jnp.int32, (bq,), 0)  # [Q]
    bounds = read_bounds(bounds)
    own = pos // rule.select_block  # [Q]
    blk_lo, blk_hi = lo_ref[...], hi_ref[...]  # [Q]: the query's sequence or document
    last = blk_hi - 1
    if rule.causal:
        last = jnp.minimum(last, own)
    share, tail = token_map(BK, rule.per_block, rule.overlap)
    col = lax.broadcasted_iota(jnp.int32, (NB,), 0)

    def visit(c, carry, masked=True):
        best, ids, spill = carry
        start = pl.multiple_of(c * BK, BK)
        k = k_ref[pl.ds(start, BK), :]  # [BK, D]
        p = probabilities(prog, q, k, lse2, q_pos, start, prec=prec, masked=masked,
                          bounds=bounds)  # [rows, BK]
        s = exact_dot(p, share).reshape(bq, G, NB).sum(axis=1)  # [Q, NB]
        s = s + jnp.where(col == 0, spill[:, None], 0.0)
        spill = jnp.sum(p * tail[None, :], axis=1).reshape(bq, G).sum(axis=1)  # [Q]
        j = c * NB + col  # [NB] block ids
        key = _rule_keys(s, j[None, :], blk_lo[:, None], last[:, None], own[:, None],
                         own[:, None], rule)  # [Q, NB]
        best, ids = _insert(best, ids, key, j, rule.num_selected)
        return best, ids, spill

    # Chunks from the first block any query may take to the last; the token mask is needed only
    # on chunks some row does not see whole.
    c_lo = jnp.min(blk_lo) // NB
    c_hi = jnp.maximum(jnp.max(last) // NB + 1, c_lo)
    _, _, flo, fhi = bounded_ranges(prog.rule, first, first + bq - 1, BK, bounds)
    flo = jnp.clip(flo, c_lo, c_hi)
    fhi = jnp.clip(fhi, flo, c_hi)
    carry = (jnp.full((bq, n_p), -jnp.inf, jnp.float32), jnp.full((bq, n_p), _NONE, jnp.int32),
             jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(c_lo, flo, visit, carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(visit, masked=False), carry)
    best, ids, _ = lax.fori_loop(fhi, c_hi, visit, carry)
    out_ref[...] = jnp.where(best > -jnp.inf, ids, _NONE)


def per_token_top_blocks(q, k_c, lse, offsets, block_lo, block_hi, *, num_blocks: int,
                         token_rule: MaskRule, rule: BlockRule, scale: float, config: FlashConfig, bounds=None,
                         interpret: bool = False):
    """Each query's top-n selection blocks, chosen from its compressed attention.

    Args:
      q: [B, T, HQ, D]; k_c: [B, N_c, H, D]; lse: [B, T, HQ] float32 from the compressed branch.
      offsets: int32[B], key position of query 0.
      block_lo, block_hi: int32 [B, T]: the selection blocks holding the query's sequence (its
        document for packed rows); causal rules further end them at the query's own block.
      num_blocks: selection blocks of the keys, N_s = ceil(S / l'); ``block_hi <= num_blocks``.
      token_rule: visibility of compressed tokens (stride d, offset l - 1).
      rule: the selection rule (`BlockRule.fused` must be None).
      config: tiling; rows per program are ``block_q`` x the padded group, chunks
        ``rule.chunk(config.block_k)`` tokens.
      bounds: optional (lo, hi) int32 [B, T]: query t sees compressed tokens lo[t] .. hi[t] - 1.

    Returns:
      int32 [B, H, T, n]: block ids in no particular order, -1 for unused entries.
    """
    B, T = q.shape[:2]
    H, n = k_c.shape[2], rule.num_selected
    if T == 0:
        return jnp.zeros((B, H, 0, n), jnp.int32)
    BK = rule.chunk(config.block_k)
    # Whole chunks up to the last block; they hold every compressed token (N_c <= N_s * l' / d).
    n_chunks = max(1, -(-num_blocks // (BK // rule.per_block)))
    # Tokens past the chunks are never visited: a longer k_c (a decode cache) is read as it is.
    k_pad = jnp.pad(k_c, ((0, 0), (0, max(0, n_chunks * BK - k_c.shape[1])), (0, 0), (0, 0)))
    lay = Launch.of(q, k_pad, block_q=config.block_q, block_k=BK)
    k_spec, k_in = lay.keys(k_pad, lay.D_p)
    n_p = pow2(n)
    bound_specs, bound_args = lay.bound_inputs(bounds)
    pad_t = lambda x, fill: jnp.pad(x.astype(jnp.int32), ((0, 0), (0, lay.T_p - T)),
                                    constant_values=fill)
    query_spec = pl.BlockSpec((None, lay.block_q), lambda b, h, i: (b, i))
    ids = pl.pallas_call(
        functools.partial(_kernel, prog=lay.program(token_rule, scale), rule=rule, n_p=n_p),
        grid=(B, H, lay.num_q_tiles),
        in_specs=(pl.BlockSpec(), lay.tile_spec(), lay.tile_spec(lay.D_p), k_spec, query_spec,
                  query_spec, bound_specs),
        out_specs=pl.BlockSpec((None, None, lay.block_q, n_p), lambda b, h, i: (b, h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, lay.T_p, n_p), jnp.int32),
        compiler_params=config.compiler_params(),
        interpret=interpret,
        name="nsa_per_token_top_blocks",
    )(offsets.astype(jnp.int32), lay.group_lse(lse), lay.group(q, lay.D_p),
      k_in, pad_t(block_lo, FAR), pad_t(block_hi, 0), bound_args)
    return ids[:, :, :T, :n]


def _tile_top_kernel(span_ref, kvb_ref, s_ref, ids_ref, cnt_ref, *, rule: BlockRule, tiles: int,
                     num_blocks: int, n_p: int):
    b, c = pl.program_id(0), pl.program_id(2)
    first, last = span_ref[2 * (b * tiles + c)], span_ref[2 * (b * tiles + c) + 1]
    s = s_ref[...]  # [N_sp], the row padded to a power of two
    j = lax.broadcasted_iota(jnp.int32, s.shape, 0)
    ls = rule.select_block
    last_blk = jnp.minimum(kvb_ref[b], num_blocks) - 1
    if rule.causal:
        last_blk = jnp.minimum(last_blk, last // ls)
    key = _rule_keys(s, j, 0, last_blk, first // ls, last // ls, rule)
    slot = lax.broadcasted_iota(jnp.int32, (n_p,), 0)

    def pick(i, carry):
        key, chosen = carry
        top = jnp.max(key)
        at = jnp.min(jnp.where(key == top, j, FAR))
        chosen = jnp.where((slot == i) & (top > -jnp.inf), at, chosen)
        return jnp.where(j == at, -jnp.inf, key), chosen

    _, chosen = lax.fori_loop(0, rule.num_selected, pick, (key, jnp.full((n_p,), FAR, jnp.int32)))
    # Ascending ids, unused slots (FAR) last: each id goes to the slot of its rank.
    rank = jnp.sum((chosen[None, :] < chosen[:, None]).astype(jnp.int32), axis=1)  # [n_p]
    ids = jnp.min(jnp.where(rank[None, :] == slot[:, None], chosen[None, :], FAR), axis=1)
    ids_ref[...] = jnp.where(ids < FAR, ids, _NONE)
    cnt_ref[...] = jnp.sum((ids < FAR).astype(jnp.int32), keepdims=True)


# H200, B=32, one-token steps at 64k/128k (HQ=64, H=4): 2 warps 174/268 us a step, 1 185/286,
# 4 184/279, 8 191/277 (one sample each; steps vary by about 10 us from run to run).
TOP_WARPS = 2


def tile_top_blocks(scores, tile_first, tile_last, kv_blocks, *, rule: BlockRule,
                    num_warps: int = TOP_WARPS, interpret: bool = False):
    """`nsa_jax.ops.selection.choose_blocks` of unpacked rows in one program per (row, KV head,
    tile): the rules and n rounds of taking the best block (ties to the lower id) on chip.

    Args:
      scores: float32 [B, H, C, N_s] block scores of C query tiles.
      tile_first, tile_last: int32 [B, C], positions of each tile's first and last query.
      kv_blocks: int32 [B], selection blocks holding each row's keys.

    Returns:
      (ids int32 [B, H, C, n] ascending, -1 after ``counts``; counts int32 [B, H, C]).
    """
    B, H, C, N_s = scores.shape
    n = rule.num_selected
    if C == 0 or N_s == 0:
        return jnp.full((B, H, C, n), _NONE, jnp.int32), jnp.zeros((B, H, C), jnp.int32)
    n_p, N_sp = pow2(n), pow2(N_s)
    scores = jnp.pad(scores, ((0, 0), (0, 0), (0, 0), (0, N_sp - N_s)))
    span = jnp.stack([tile_first, tile_last], axis=-1).astype(jnp.int32).reshape(-1)
    ids, counts = pl.pallas_call(
        functools.partial(_tile_top_kernel, rule=rule, tiles=C, num_blocks=N_s, n_p=n_p),
        grid=(B, H, C),
        in_specs=(pl.BlockSpec(), pl.BlockSpec(),
                  pl.BlockSpec((None, None, None, N_sp), lambda b, h, c: (b, h, c, 0))),
        out_specs=(pl.BlockSpec((None, None, None, n_p), lambda b, h, c: (b, h, c, 0)),
                   pl.BlockSpec((None, None, None, 1), lambda b, h, c: (b, h, c, 0))),
        out_shape=(jax.ShapeDtypeStruct((B, H, C, n_p), jnp.int32),
                   jax.ShapeDtypeStruct((B, H, C, 1), jnp.int32)),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="nsa_tile_top_blocks",
    )(span, kv_blocks.astype(jnp.int32).reshape(B), scores)
    return ids[..., :n], counts[..., 0]
