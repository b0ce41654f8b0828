"""Cases specific to the "triton" implementation (the shared suite covers the rest)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import reference, segments
from nsa_jax.ops import triton as pallas_triton
from nsa_jax.kernels.common import pow2 as pl_pow2
from nsa_jax.kernels.triton.flash_fwd import FlashConfig
from nsa_jax.kernels.triton.tiling import Tiling, TritonTilings
from conftest import FWD_TOL, GRAD_TOL, IMPLEMENTATIONS, ON_GPU, assert_close, normal

TRITON = IMPLEMENTATIONS["triton"]


def _inputs(T, HQ=4, H=2, D=16, Dv=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (normal(ks[0], (1, T, HQ, D)), normal(ks[1], (1, T, H, D)), normal(ks[2], (1, T, H, Dv)))


def _kernel_names(fn, *args):
    return re.findall(r"name=(nsa_\w+)", str(jax.make_jaxpr(fn)(*args)))


def _kernel_grids(fn, *args):
    """[(kernel name, grid)] of the Pallas calls ``fn`` makes."""
    grids = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grids.append((eqn.params["name"], eqn.params["grid_mapping"].grid))
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    visit(inner)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


def test_scoring_in_chunks_matches_one_pass(monkeypatch):
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=16, select_block=32, num_selected=3,
                            select_q_tile=16)
    q, k, v = _inputs(150)
    k_c, _ = nsa_jax.compress(k, v, config=cfg)
    whole = nsa_jax.select_blocks(q, k_c, config=cfg, **TRITON)
    monkeypatch.setattr(pallas_triton, "MASS_BYTES", 2 * 9 * 4 * 3)  # 3 tiles per chunk
    chunked = nsa_jax.select_blocks(q, k_c, config=cfg, **TRITON)
    np.testing.assert_array_equal(np.asarray(chunked.indices), np.asarray(whole.indices))
    np.testing.assert_array_equal(np.asarray(chunked.counts), np.asarray(whole.counts))
    ref = reference.select_blocks(q, k_c, config=cfg)
    np.testing.assert_array_equal(np.asarray(whole.counts), np.asarray(ref.counts))


def test_bounded_ranges_stay_inside_the_rule_range():
    """Rows past T carry far-away bounds; a program of only such rows must get an empty range
    inside the rule's (the scoring kernel clears every block outside it)."""
    from nsa_jax.kernels.common import MaskRule, block_range, bounded_ranges
    rule = MaskRule(num_keys=100, key_stride=16, key_offset=31)
    far = jnp.full((16,), 2 ** 30, jnp.int32)
    lo, hi, flo, fhi = (int(x) for x in bounded_ranges(rule, 5000, 5015, 16, (far, far)))
    _, rule_hi = block_range(rule, 5000, 5015, 16)
    assert lo == hi == flo == fhi <= int(rule_hi) == 7


def test_packed_scoring_in_chunks_matches_the_reference(monkeypatch):
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=16, select_block=32, num_selected=3,
                            window=8)
    q, k, v = _inputs(150)
    seg = nsa_jax.segment_ids_from_cu_seqlens(jnp.array([0, 40, 41, 120]), 150)
    monkeypatch.setattr(pallas_triton, "MASS_BYTES", 2 * 9 * 4 * 5)  # a few query rows per chunk
    out = nsa_jax.nsa_attention(q, k, v, config=cfg, segment_ids=seg, **TRITON)
    want = reference.nsa_attention(q, k, v, config=cfg, segment_ids=seg)
    assert_close(out, want, FWD_TOL[jnp.float32], "o")


def _spy_fused(monkeypatch):
    calls = []
    real = pallas_triton.per_token_top_blocks

    def spy(*args, **kwargs):
        calls.append(kwargs["rule"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pallas_triton, "per_token_top_blocks", spy)
    return calls


def _assert_same_selection(got, want):
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    np.testing.assert_array_equal(np.asarray(got.counts), np.asarray(want.counts))


# (T, S, HQ, H, D, config overrides), beyond the shared suite's per-token cases: l' = d (a chunk
# of 64 tokens holds 64 blocks) with n not a power of two and a decode offset S > T; G = 16
# non-causal.
PER_TOKEN_CASES = {
    "G2-decode-lsd-n5": (37, 171, 4, 2, 8, dict(compress_block=16, compress_stride=16,
                                                select_block=16, num_selected=5)),
    "G16-noncausal": (150, 150, 16, 1, 16, dict(causal=False, window=0, num_selected=3)),
}


@pytest.mark.parametrize("case", PER_TOKEN_CASES)
def test_per_token_selection_kernel_matches_the_reference(monkeypatch, case):
    T, S, HQ, H, D, over = PER_TOKEN_CASES[case]
    cfg = nsa_jax.NSAConfig(**{"compress_block": 32, "compress_stride": 16, "select_block": 32,
                               **over})
    ks = jax.random.split(jax.random.key(T), 2)
    q, k = normal(ks[0], (2, T, HQ, D)), normal(ks[1], (2, S, H, D))
    k_c, _ = nsa_jax.compress(k, k, config=cfg)
    calls = _spy_fused(monkeypatch)
    # Per-row lengths (the backend refuses them for non-causal compressed attention).
    kv_len = jnp.array([S, S - 41]) if cfg.causal else None
    got = nsa_jax.select_blocks(q, k_c, config=cfg, kv_len=kv_len, **TRITON)
    assert len(calls) == 1
    _assert_same_selection(got, reference.select_blocks(q, k_c, config=cfg, kv_len=kv_len))
    again = nsa_jax.select_blocks(q, k_c, config=cfg, kv_len=kv_len, **TRITON)
    _assert_same_selection(again, got)


def test_per_token_selection_kernel_in_packed_rows(monkeypatch):
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=16, select_block=32, num_selected=3,
                            num_local=1)
    q, k, _ = _inputs(150, HQ=4, H=1)
    seg = nsa_jax.segment_ids_from_cu_seqlens(jnp.array([0, 40, 41, 120]), 150)
    k_cp, _ = nsa_jax.compress(k, k, config=cfg, segment_ids=seg)
    calls = _spy_fused(monkeypatch)
    got = nsa_jax.select_blocks(q, k_cp, config=cfg, segment_ids=seg, **TRITON)
    assert len(calls) == 1
    want = reference.select_blocks(q, k_cp, config=cfg, segment_ids=seg)
    # Rows of the aligned layout that hold a token (the others choose nothing that is used).
    rows = np.asarray(segments.pack(seg, cfg).dest[0])
    rows = rows[rows < got.indices.shape[2]]
    np.testing.assert_array_equal(np.asarray(got.indices)[:, :, rows],
                                  np.asarray(want.indices)[:, :, rows])


def test_per_token_selection_outside_the_kernel_rule_falls_back(monkeypatch):
    """A compressed token spanning more than one block past its own (l - d > l') cannot use the
    fused kernel's single carry; the mass kernel path gives the same selection."""
    cfg = nsa_jax.NSAConfig(compress_block=64, compress_stride=16, select_block=32,
                            num_selected=4)
    assert pallas_triton._block_rule(cfg).fused() is not None
    q, k, _ = _inputs(140)
    k_c, _ = nsa_jax.compress(k, k, config=cfg)
    calls = _spy_fused(monkeypatch)
    got = nsa_jax.select_blocks(q, k_c, config=cfg, **TRITON)
    assert not calls
    _assert_same_selection(got, reference.select_blocks(q, k_c, config=cfg))


def test_running_top_n_keeps_ties_on_the_lower_id():
    from nsa_jax.kernels.triton.top_blocks import _insert
    keys = jnp.asarray(np.random.default_rng(0).integers(0, 5, (6, 96)).astype(np.float32))
    keys = keys.at[0, 40:].set(-jnp.inf)  # fewer candidates than n on one row
    best, ids = jnp.full((6, 8), -jnp.inf), jnp.full((6, 8), -1, jnp.int32)
    for c in range(6):
        blk = jnp.arange(16 * c, 16 * c + 16)
        best, ids = _insert(best, ids, keys[:, 16 * c:16 * c + 16], blk, 7)
    vals, want = jax.lax.top_k(keys, 7)
    got = jnp.where(best[:, :7] > -jnp.inf, ids[:, :7], -1)
    want = jnp.where(vals > -jnp.inf, want, -1)
    np.testing.assert_array_equal(np.sort(np.asarray(got)), np.sort(np.asarray(want)))


def test_block_map_product_keeps_float32_accuracy():
    """The token -> block product splits float32 into bfloat16 parts by truncation; a split by
    casting would be folded away under jit (XLA drops f32 -> bf16 -> f32 round trips)."""
    from nsa_jax.kernels.triton.block_map import exact_dot
    p = jax.random.uniform(jax.random.key(0), (32, 64))
    m = (jnp.arange(64)[:, None] // 4 == jnp.arange(16)[None, :]).astype(jnp.bfloat16)
    got = jax.jit(exact_dot)(p, m)
    want = p.reshape(32, 16, 4).sum(-1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=3e-7, atol=0)


@pytest.mark.parametrize("select_block", [128, 48])
def test_selected_blocks_reblocked_to_the_kernel_tile(select_block):
    """Selection blocks larger than the kernel's KV tile are expanded (128 -> 64), and sizes that
    are not a power of two use the largest power-of-two tile dividing them (48 -> 16)."""
    cfg = nsa_jax.NSAConfig(select_block=select_block, num_selected=4, select_q_tile=1)
    q, k, v = _inputs(300, HQ=4, H=1)
    k_c, _ = nsa_jax.compress(k, v, config=cfg)
    sel = reference.select_blocks(q, k_c, config=cfg)
    o = nsa_jax.selected_attention(q, k, v, sel, config=cfg, **TRITON)
    assert_close(o, reference.selected_attention(q, k, v, sel, config=cfg), FWD_TOL[jnp.float32], "o")


def test_select_block_without_a_16_key_tile_is_refused():
    cfg = nsa_jax.NSAConfig(compress_block=8, compress_stride=8, select_block=24, num_selected=4)
    q, k, v = _inputs(64)
    k_c, _ = nsa_jax.compress(k, v, config=cfg)
    sel = reference.select_blocks(q, k_c, config=cfg)
    with pytest.raises(NotImplementedError, match="select_block divisible by 16, got 24"):
        nsa_jax.selected_attention(q, k, v, sel, config=cfg, **TRITON)


@pytest.mark.parametrize("field,value", [("block_q", 48), ("block_k", 8), ("num_warps", 3),
                                         ("num_stages", 0)])
def test_flash_config_validation(field, value):
    with pytest.raises(ValueError, match=f"FlashConfig.{field}={value}"):
        FlashConfig(**{field: value})


def _grad_check(fn, ref_fn, args, names):
    out, vjp = jax.vjp(fn, *args)
    ref_out, ref_vjp = jax.vjp(ref_fn, *args)
    ct = jax.tree.map(lambda x: normal(jax.random.key(3), x.shape), out)
    for name, g, rg in zip(names, vjp(ct), ref_vjp(ct)):
        assert_close(g, rg, GRAD_TOL[jnp.float32], f"d{name}")


@pytest.mark.parametrize("select_block", [128, 48])
def test_selected_gradients_reblocked(select_block):
    cfg = nsa_jax.NSAConfig(select_block=select_block, num_selected=4, select_q_tile=16)
    q, k, v = _inputs(300, HQ=4, H=1)
    k_c, _ = nsa_jax.compress(k, v, config=cfg)
    sel = reference.select_blocks(q, k_c, config=cfg)
    _grad_check(lambda q, k, v: nsa_jax.selected_attention(q, k, v, sel, config=cfg, **TRITON),
                lambda q, k, v: reference.selected_attention(q, k, v, sel, config=cfg),
                (q, k, v), "q k v".split())


def test_compressed_lse_cotangent():
    """The log-sum-exp output is differentiable too (d lse / d s = p)."""
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=8)
    q, _, _ = _inputs(40, seed=1)
    _, k, v = _inputs(203, seed=2)
    k_c, v_c = nsa_jax.compress(k, v, config=cfg)
    _grad_check(lambda *a: nsa_jax.compressed_attention(*a, config=cfg, kv_len=203, **TRITON),
                lambda *a: reference.compressed_attention(*a, config=cfg, kv_len=203),
                (q, k_c, v_c), "q k_c v_c".split())


@pytest.mark.parametrize("q_tile", [1, 16])
def test_gradients_run_on_the_backward_kernels(monkeypatch, q_tile):
    monkeypatch.setattr(pallas_triton, "BY_BLOCK_MIN_QUERIES", 1)
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=32, num_selected=3,
                            window=32, select_q_tile=q_tile)
    q, k, v = _inputs(64)
    loss = lambda q, k, v: nsa_jax.nsa_attention(q, k, v, config=cfg, **TRITON).sum()
    kernels = _kernel_names(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    # The range branches: one dQ and one dK/dV kernel each. The selected branch: per token, the
    # block-major backward and its sum of dK/dV over work items; tiled, a dQ kernel and two
    # dK/dV kernels (all blocks, heavy blocks).
    by_block = int(q_tile == 1)
    assert kernels.count("nsa_flash_bwd_dq") == 3 - by_block
    assert kernels.count("nsa_flash_bwd_dkv") == 4 - 2 * by_block
    assert kernels.count("nsa_selected_by_block_bwd") == by_block
    assert kernels.count("nsa_selected_by_block_sum") == by_block


@pytest.mark.parametrize("heavy,target", [(2, 1), (0, 64)])
def test_gradients_with_other_work_splits(monkeypatch, heavy, target):
    """Small cases split every block; here most blocks take the unsplit path (heavy=2, target=1)
    or none is heavy (heavy=0), and the gradients still match the reference."""
    from nsa_jax.kernels.triton import flash_bwd
    monkeypatch.setattr(flash_bwd, "HEAVY_BLOCKS", heavy)
    monkeypatch.setattr(flash_bwd, "TARGET_PROGRAMS", target)
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=32, num_selected=4,
                            window=40, select_q_tile=16)
    q, k, v = _inputs(333, HQ=4, H=2)
    _grad_check(lambda q, k, v: nsa_jax.nsa_attention(q, k, v, config=cfg, **TRITON),
                lambda q, k, v: reference.nsa_attention(q, k, v, config=cfg),
                (q, k, v), "q k v".split())


@pytest.mark.skipif(ON_GPU, reason="interpret mode only: on a GPU outputs start as whatever memory held")
def test_interpret_mode_poisons_outputs():
    """The shared suite relies on this: in interpret mode a kernel's outputs start as NaN, so an
    element a kernel forgets to write fails `assert_close` (which rejects NaN)."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[:4] = x_ref[:4]  # rows 4.. are never written

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                         interpret=True)(jnp.ones((8,), jnp.float32))
    assert not np.isnan(np.asarray(out[:4])).any() and np.isnan(np.asarray(out[4:])).all()


@pytest.mark.parametrize("HQ,H,forward", [(4, 2, "nsa_selected_by_block"), (16, 1, "nsa_flash_fwd")])
def test_per_token_selected_branch_picks_its_kernels(monkeypatch, HQ, H, forward):
    """Per token, small groups run block-major both ways; G = 16 runs its forward query-major and
    its backward block-major (`ops.triton.BY_BLOCK_MAX_GROUP*`)."""
    monkeypatch.setattr(pallas_triton, "BY_BLOCK_MIN_QUERIES", 64)
    cfg = nsa_jax.NSAConfig(select_block=32, num_selected=3)
    q, k, v = _inputs(70, HQ=HQ, H=H)
    sel = reference.select_blocks(q, nsa_jax.compress(k, v, config=cfg)[0], config=cfg)
    loss = lambda q, k, v: nsa_jax.selected_attention(q, k, v, sel, config=cfg, **TRITON).sum()
    names = _kernel_names(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert names.count(forward) == 1 and names.count("nsa_selected_by_block_bwd") == 1
    assert "nsa_flash_bwd_dq" not in names


@pytest.mark.parametrize("select_q_tile", [1, 4])
def test_few_queries_select_in_the_compressed_pass(monkeypatch, select_q_tile):
    """A call of a few queries (a decode step) runs the compressed kernel that also writes its
    block sums, and no scoring kernel; it selects what the two-pass path selects, and its output
    and gradients (through the fused pass's own backward) match the reference, also with every
    branch in shares. 7 queries at an offset S > T: tiles of 4 straddle a selection block. Only
    each tile's own blocks are forced, so the scores choose three of the four blocks among 19."""
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4,
                            num_initial=0, num_local=1, window=16, select_q_tile=select_q_tile)
    q, _, _ = _inputs(7, seed=4)
    _, k, v = _inputs(300, seed=5)
    run = lambda *a, **kw: nsa_jax.nsa_attention(*a, config=cfg, return_selection=True, **kw,
                                                 **TRITON)
    names = _kernel_names(run, q, k, v)
    assert {"nsa_flash_fwd_scored", "nsa_scored_block_mass", "nsa_tile_top_blocks"} <= set(names)
    assert not {"nsa_per_token_top_blocks", "nsa_compressed_mass"} & set(names)
    o, sel = run(q, k, v)
    _, want = nsa_jax.nsa_attention(q, k, v, config=cfg, return_selection=True,
                                    implementation="reference")
    np.testing.assert_array_equal(np.asarray(sel.indices), np.asarray(want.indices))
    monkeypatch.setattr(pallas_triton, "SCORED_MAX_QUERIES", 0)
    jax.clear_caches()  # traces made before the patch would be reused
    assert "nsa_flash_fwd_scored" not in _kernel_names(run, q, k, v)
    o_apart, sel_apart = run(q, k, v)
    np.testing.assert_array_equal(np.asarray(sel.indices), np.asarray(sel_apart.indices))
    np.testing.assert_array_equal(np.asarray(sel.counts), np.asarray(sel_apart.counts))
    assert_close(o, o_apart, FWD_TOL[jnp.float32], "o")
    monkeypatch.undo()
    # Shares in every branch: the 36 compressed tokens are two KV blocks of 32 (16 selection
    # blocks of 2 strides each), the window's 16 + 7 keys two blocks of 16, the 4 selected
    # blocks four of 16.
    monkeypatch.setitem(pallas_triton.MIN_SHARE, "compressed", 1)
    monkeypatch.setitem(pallas_triton.MIN_SHARE, "window", 1)
    jax.clear_caches()
    tilings = TritonTilings(scored=Tiling(block_k=16), window=Tiling(block_k=16))
    grids = _kernel_grids(lambda *a: run(*a, tilings=tilings), q, k, v)
    # Two shares per query tile: the compressed pass and the window have one tile of 8 queries,
    # the selected branch one per selection tile.
    sel_tiles = 7 if select_q_tile == 1 else 2
    assert ("nsa_flash_fwd_scored", (1, 2, 2)) in grids
    assert sorted(g for name, g in grids if name == "nsa_flash_fwd") == sorted(
        [(1, 2, 2), (1, 2, 2 * sel_tiles)])
    o_shared, sel_shared = run(q, k, v, tilings=tilings)
    np.testing.assert_array_equal(np.asarray(sel_shared.indices), np.asarray(sel.indices))
    assert_close(o_shared, o, FWD_TOL[jnp.float32], "o in shares")
    if select_q_tile == 1:  # the pass's backward is the compressed branch's, whatever the tile
        _grad_check(lambda *a: nsa_jax.nsa_attention(*a, config=cfg, tilings=tilings, **TRITON),
                    lambda *a: nsa_jax.nsa_attention(*a, config=cfg, implementation="reference"),
                    (q, k, v), "q k v".split())
    monkeypatch.undo()
    jax.clear_caches()


def test_few_queries_run_the_selected_branch_query_major():
    """A call with fewer queries than `ops.triton.BY_BLOCK_MIN_QUERIES` (a decode step) shares no
    block between queries, so even a small group runs query-major both ways."""
    cfg = nsa_jax.NSAConfig(select_block=32, num_selected=3)
    q, k, v = _inputs(70, HQ=2, H=1)  # not the shapes of a patched test above: no cached trace
    assert 70 < pallas_triton.BY_BLOCK_MIN_QUERIES
    sel = reference.select_blocks(q, nsa_jax.compress(k, v, config=cfg)[0], config=cfg)
    loss = lambda q, k, v: nsa_jax.selected_attention(q, k, v, sel, config=cfg, **TRITON).sum()
    names = _kernel_names(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert "nsa_flash_fwd" in names and "nsa_flash_bwd_dq" in names
    assert not any(n.startswith("nsa_selected_by_block") for n in names)


# G = 1 with D != Dv; G = 16 forced block-major in packed rows, with a decode offset S > T.
BY_BLOCK_CASES = {
    "G1-D24-Dv40": (101, 101, 2, 2, 24, 40, None),
    "G16-packed": (83, 83, 16, 1, 16, 16, [0, 30, 31, 83]),
    "G4-decode": (45, 170, 8, 2, 16, 16, None),
}


@pytest.mark.parametrize("case", BY_BLOCK_CASES)
def test_block_major_selected_attention_matches_the_reference(monkeypatch, case):
    """Work items of one chunk (8 or 16 rows), so most blocks are cut into several items whose
    dK/dV are summed, and launches of a third of the queries; forward and gradients against the
    reference, and reruns bit-identical."""
    from nsa_jax.kernels.triton import selected_by_block
    T, S, HQ, H, D, Dv, cu = BY_BLOCK_CASES[case]
    monkeypatch.setattr(pallas_triton, "BY_BLOCK_MAX_GROUP", 16)
    monkeypatch.setattr(pallas_triton, "BY_BLOCK_MIN_QUERIES", 1)
    monkeypatch.setattr(selected_by_block, "CHUNKS_PER_PROGRAM", 1)
    monkeypatch.setattr(selected_by_block, "BWD_CHUNKS_PER_PROGRAM", 1)
    # Launches of a third of the queries (or fewer): float32 partials of n = 4 blocks each.
    width = max(16, 1 << (max(D, Dv) - 1).bit_length())
    monkeypatch.setattr(selected_by_block, "PARTIAL_BYTES", 4 * 4 * HQ * width * -(-T // 3))
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=16,
                            num_selected=4, select_q_tile=1)
    ks = jax.random.split(jax.random.key(T), 3)
    q = normal(ks[0], (1, T, HQ, D))
    k, v = normal(ks[1], (1, S, H, D)), normal(ks[2], (1, S, H, Dv))
    kw = {} if cu is None else dict(segment_ids=nsa_jax.segment_ids_from_cu_seqlens(
        jnp.array(cu), T))
    sel = reference.select_blocks(q, nsa_jax.compress(k, v, config=cfg, **kw)[0], config=cfg,
                                  kv_len=None if cu else S, **kw)
    fn = jax.jit(lambda q, k, v: nsa_jax.selected_attention(q, k, v, sel, config=cfg, **kw,
                                                            **TRITON))
    assert "nsa_selected_by_block" in _kernel_names(fn, q, k, v)
    ref_fn = lambda q, k, v: reference.selected_attention(q, k, v, sel, config=cfg, **kw)
    assert_close(fn(q, k, v), ref_fn(q, k, v), FWD_TOL[jnp.float32], "o")
    _grad_check(fn, ref_fn, (q, k, v), "q k v".split())
    grads = jax.grad(lambda q, k, v: (fn(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
    for a, b in zip(grads(q, k, v), grads(q, k, v)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_block_major_work_items_cover_each_block_once():
    from nsa_jax.kernels.triton.selected_by_block import block_entries, work_items
    ids = jnp.array([[[[0, 2, -1], [0, 1, 2], [2, -1, -1], [0, 2, 3]]]], jnp.int32)  # [1,1,4,3]
    counts = jnp.array([[[2, 3, 1, 3]]], jnp.int32)
    entries, offsets = block_entries(ids, counts, 5)
    # block 0: (t0, e0), (t1, e0), (t3, e0); 1: (t1, e1); 2: t0 e1, t1 e2, t2 e0, t3 e1; 3: t3 e2
    np.testing.assert_array_equal(entries[0, 0], [0, 3, 9, 4, 1, 5, 6, 10, 11, -1, -1, -1])
    np.testing.assert_array_equal(offsets[0, 0], [0, 3, 4, 8, 9, 9])
    (blk, lo, hi), (first, pieces) = work_items(offsets, 2, 9)
    np.testing.assert_array_equal(blk[0, 0, :6], [0, 0, 1, 2, 2, 3])
    np.testing.assert_array_equal(lo[0, 0], [0, 2, 3, 4, 6, 8, 0, 0, 0])
    np.testing.assert_array_equal(hi[0, 0], [2, 3, 4, 6, 8, 9, 0, 0, 0])
    np.testing.assert_array_equal(first[0, 0], [0, 2, 3, 5, 6])
    np.testing.assert_array_equal(pieces[0, 0], [2, 1, 2, 1, 0])


@pytest.mark.parametrize("T,G,N,window,splits", [
    (2, 3, 300, 960, 1), (2, 3, 300, 960, 3), (1, 16, 512, 0, 2), (5, 1, 200, 0, 1)])
def test_scored_block_mass_matches_the_selection_rules(T, G, N, window, splits):
    """A decode step's block scores (the forward's block sums, then `scored_block_mass`) against
    `selection.block_scores` of the probabilities in float64: KV blocks no share walks (before
    and after a window), tokens spilling into the next KV block and past the last one,
    padded queries and heads. With N = 512 the 8 KV blocks fill the sums' room, so the last
    token's spill is the kernel's edge output."""
    from nsa_jax.kernels.common import MaskRule
    from nsa_jax.kernels.triton.block_scores import scored_block_mass
    from nsa_jax.kernels.triton.flash_fwd import BlockSums, flash_forward
    from nsa_jax.ops import selection
    H, D, d, l, ls = 2, 16, 8, 16, 32
    q, _, _ = _inputs(T, HQ=H * G, H=H, D=D, seed=6)
    _, k, _ = _inputs(N, HQ=H, H=H, D=D, seed=7)
    offset = 2000 if window else N * d + 8
    rule = MaskRule(num_keys=N, key_stride=d, key_offset=l - 1, window=window)
    o, lse, sums = flash_forward(
        q, k, k, jnp.array([offset]), rule=rule, scale=0.5,
        config=FlashConfig(block_q=pl_pow2(T), block_k=64, splits=splits), interpret=True,
        block_sums=BlockSums(per_block=ls // d, overlap=l // d))
    got = np.asarray(scored_block_mass(sums, lse, interpret=True))[0]  # [H, T_p, blocks]
    pos = offset + np.arange(T)[:, None]
    last = np.arange(N) * d + l - 1
    seen = (last[None] <= pos) & ((pos - last[None] < window) if window else True)  # [T, N]
    if window:
        assert not seen[:, :64].any() and not seen[:, 256:].any()  # KV blocks 0 and 4 unseen
    else:
        assert seen[:, -1].all()
    qg = np.asarray(q[0], np.float64).reshape(T, H, G, D)
    logits = np.einsum("thgd,nhd->htgn", qg, np.asarray(k[0], np.float64)) * 0.5
    logits = np.where(seen[None, :, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)  # [H, T, G, N]
    cfg = nsa_jax.NSAConfig(compress_block=l, compress_stride=d, select_block=ls)
    N_s = -(-(N * d + l) // ls)
    want = np.asarray(selection.block_scores(jnp.asarray(p.sum(axis=2)), cfg, N_s))
    assert got.shape[-1] >= N_s
    np.testing.assert_allclose(got[:, :T, :N_s], want, rtol=2e-5, atol=1e-7)
    assert not got[:, :T, N_s:].any()


@pytest.mark.parametrize("N_s,n,num_initial,num_local,causal", [
    (37, 5, 1, 2, True), (37, 5, 0, 0, True), (37, 4, 2, 1, False), (3, 5, 1, 1, True),
    (64, 16, 1, 2, True)])
def test_tile_top_blocks_matches_the_selection_rules(N_s, n, num_initial, num_local, causal):
    """The decode step's top-n kernel chooses what `selection.choose_blocks` chooses: scores
    with many ties (ties to the lower id), tiles straddling a block boundary (own blocks above
    the other forced ones), rows of different key lengths, fewer blocks than n."""
    from nsa_jax.kernels.triton.top_blocks import BlockRule, tile_top_blocks
    from nsa_jax.ops import selection
    B, H, C, ls = 3, 2, 4, 16
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=ls, num_selected=n,
                            num_initial=num_initial, num_local=num_local, causal=causal)
    rng = np.random.default_rng(N_s + n)
    scores = jnp.asarray(rng.integers(0, 6, size=(B, H, C, N_s)).astype(np.float32) / 4)
    kv_blocks = jnp.asarray([N_s, N_s - 2, 1])
    first = jnp.asarray(rng.integers(0, N_s * ls, size=(B, C)), jnp.int32)
    last = first + jnp.asarray(rng.integers(0, 2 * ls, size=(B, C)), jnp.int32)
    rule = BlockRule(select_block=ls, per_block=2, overlap=2, num_selected=n,
                     num_initial=num_initial, num_local=num_local, causal=causal)
    ids, counts = tile_top_blocks(scores, first, last, kv_blocks, rule=rule, interpret=True)
    want_ids, want_counts = selection.choose_blocks(scores, first, last, cfg,
                                                    kv_blocks[:, None, None])
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(want_counts))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    assert (np.asarray(counts) > 0).any() and (np.asarray(counts) < n).any()


def _lower_for_h200(monkeypatch, fn, *args):
    """Lowers ``fn(*args)`` for "cuda" under an abstract H200 with the MLIR verifier that
    otherwise runs only when XLA compiles a Triton module on the GPU; returns the kernels' names."""
    from jax._src.pallas.triton import lowering
    from jax.sharding import AbstractDevice, AbstractMesh

    lower = lowering.lower_jaxpr_to_triton_module
    names = []

    def verified(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()
        names.append(args[0].debug_info.func_name)
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", verified)
    h200 = AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=h200)):
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return names


@pytest.mark.parametrize("with_sums,splits", [(False, 1), (True, 1), (True, 4)])
def test_decode_forward_lowers_for_cuda(monkeypatch, with_sums, splits):
    """The decode forward's Triton module is valid for an H200, checked without a GPU."""
    from nsa_jax.kernels.common import MaskRule
    from nsa_jax.kernels.triton.flash_fwd import BlockSums, flash_forward

    B, HQ, H, D, N = 2, 64, 4, 128, 512
    q = jnp.zeros((B, 1, HQ, D), jnp.bfloat16)
    k = jnp.zeros((B, N, H, D), jnp.bfloat16)
    rule = MaskRule(num_keys=N, key_stride=16, key_offset=31)
    sums = BlockSums(per_block=4, overlap=2) if with_sums else None
    f = lambda q, k, off: flash_forward(q, k, k, off, rule=rule, scale=0.1,
                                        config=FlashConfig(block_q=1, splits=splits),
                                        block_sums=sums)
    _lower_for_h200(monkeypatch, f, q, k, jnp.zeros((B,), jnp.int32))


@pytest.mark.parametrize("T", [1, 5])
def test_decode_step_lowers_for_cuda(monkeypatch, T):
    """Every Triton kernel of a decode-sized layer call (the scored compressed pass, the block
    mass, the top-n, the selected and window branches in shares) is valid for an H200."""
    from nsa_jax.kernels.triton.tiling import SM90
    from nsa_jax.ops import base

    monkeypatch.setattr(pallas_triton.TritonBackend, "available", lambda self, interpret: base.YES)
    B, HQ, H, D = 4, 64, 4, 128
    cfg = nsa_jax.NSAConfig()
    cache = nsa_jax.init_cache(B, 4096 + 37, H, D, config=cfg, dtype=jnp.bfloat16)
    q = jnp.zeros((B, T, HQ, D), jnp.bfloat16)
    k = jnp.zeros((B, T, H, D), jnp.bfloat16)
    f = lambda q, k, cache: nsa_jax.nsa_decode(q, k, k, None, cache, config=cfg,
                                               implementation="triton", tilings=SM90)
    names = _lower_for_h200(monkeypatch, f, q, k, cache)
    assert sorted(names) == ["nsa_flash_fwd"] * 2 + ["nsa_flash_fwd_scored",
                                                     "nsa_scored_block_mass",
                                                     "nsa_tile_top_blocks"]
