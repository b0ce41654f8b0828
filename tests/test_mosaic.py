"""The "mosaic" implementation: its Mosaic GPU forward, scoring and backward kernels against the
reference, on the GPU or under the Mosaic GPU interpreter (small shapes: seconds per kernel
call)."""

from __future__ import annotations

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax import reference
from nsa_jax.kernels.mosaic_gpu.flash_fwd import MosaicFlashConfig
from conftest import (FWD_TOL, GRAD_TOL, ON_GPU, assert_bit_identical, assert_close,
                      assert_same_selection, normal, upcast)

MOSAIC = dict(implementation="mosaic", interpret=not ON_GPU)
BF16 = jnp.bfloat16


def _kernels(fn, *args):
    """The forward kernels ``fn`` runs (each name once)."""
    return set(re.findall(r"(nsa_mosaic_\w+|nsa_flash_fwd|nsa_compressed_mass|nsa_tile_top_blocks)",
                          str(jax.make_jaxpr(fn)(*args))))


def _inputs(T, HQ, H, D, Dv, seed, dtype=BF16, S=None):
    ks = jax.random.split(jax.random.key(seed), 3)
    S = T if S is None else S
    return (normal(ks[0], (1, T, HQ, D), dtype), normal(ks[1], (1, S, H, D), dtype),
            normal(ks[2], (1, S, H, Dv), dtype))


def _check(fn, ref_fn, args, seed, names, dtype=BF16):
    """Forward and gradients against the float32 reference; reruns bit-identical."""
    out, vjp = jax.vjp(fn, *args)
    ref_out, ref_vjp = jax.vjp(ref_fn, *upcast(args))
    assert_close(out, ref_out, FWD_TOL[dtype], "o")
    ct = normal(jax.random.key(seed), out.shape)
    for name, got, want in zip(names, vjp(ct.astype(out.dtype)), ref_vjp(ct)):
        assert_close(got, want, GRAD_TOL[dtype], f"d{name}")
    assert_bit_identical(fn(*args), out)


# T odd; G = 1, 4, 16 (64, 16 and 4 queries per warpgroup); D != Dv (Q and O in separate
# buffers); queries after earlier keys (S > T).
@pytest.mark.parametrize("T,HQ,H,D,Dv,S", [(150, 4, 1, 24, 72, None), (131, 16, 1, 16, 16, None),
                                           (131, 2, 2, 16, 16, 203)],
                         ids=["G4-D24-Dv72", "G16", "G1-S>T"])
def test_compressed_branch(T, HQ, H, D, Dv, S):
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64, num_selected=4)
    q, k, v = _inputs(T, HQ, H, D, Dv, 1, S=S)
    k_c, v_c = nsa_jax.compress(k, v, config=cfg)
    kv_len = k.shape[1]
    fn = jax.jit(lambda q, kc, vc: nsa_jax.compressed_attention(q, kc, vc, config=cfg,
                                                                 kv_len=kv_len, **MOSAIC)[0])
    assert _kernels(fn, q, k_c, v_c) == {"nsa_mosaic_flash_fwd"}
    _check(fn, lambda *a: reference.compressed_attention(*a, config=cfg, kv_len=kv_len)[0],
           (q, k_c, v_c), 1, ("q", "k_c", "v_c"))


def test_fewer_rows_than_a_cta_run_triton():
    """A decode step (T * G_p < 128 rows) would fill a CTA mostly with padding."""
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64, num_selected=4)
    q, k, v = _inputs(3, 8, 2, 16, 16, 1, S=203)
    k_c, v_c = nsa_jax.compress(k, v, config=cfg)
    fn = jax.jit(lambda q, kc, vc: nsa_jax.compressed_attention(q, kc, vc, config=cfg,
                                                                 kv_len=203, **MOSAIC)[0])
    assert _kernels(fn, q, k_c, v_c) == {"nsa_flash_fwd"}


@pytest.mark.parametrize("causal,pingpong,prefetch_q,Dv", [(True, True, False, 16),
                                                           (False, False, True, 40)])
def test_window_branch_where_warpgroups_see_different_blocks(causal, pingpong, prefetch_q, Dv):
    """A window of 48 keys and 64-key blocks: the two warpgroups of a CTA start at different
    blocks, so each skips blocks the other needs."""
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64, num_selected=4,
                            window=48, causal=causal)
    q, k, v = _inputs(203, 8, 2, 16, Dv, 2)
    tilings = nsa_jax.MosaicTilings(window=MosaicFlashConfig(pingpong=pingpong,
                                                             prefetch_q=prefetch_q))
    fn = jax.jit(lambda q, k, v: nsa_jax.sliding_window_attention(q, k, v, config=cfg,
                                                                  tilings=tilings, **MOSAIC))
    assert _kernels(fn, q, k, v) == {"nsa_mosaic_flash_fwd"}
    _check(fn, lambda *a: reference.sliding_window_attention(*a, config=cfg), (q, k, v), 2,
           ("q", "k", "v"))


@pytest.mark.parametrize("select_block,block_k,dq_block_k,prefetch_q,heavy", [
    (64, 64, 64, False, 1), (128, 128, 64, True, 8), (64, 128, 128, False, 0)])
def test_selected_branch_walks_the_table(monkeypatch, select_block, block_k, dq_block_k,
                                         prefetch_q, heavy):
    """The forward, dQ and dK/dV (``selected_dq``, ``selected_dkv``) walk the table on Mosaic
    GPU: blocks of 128 keys whole or as two tiles of 64 (the forward's table reblocked for dQ);
    a 128-key tiling of 64-key blocks runs at 64; dK/dV with ``heavy`` of the 4 KV blocks of 64
    keys cut into 3 shares (all, some or none)."""
    from nsa_jax.kernels.mosaic_gpu import flash_bwd
    monkeypatch.setattr(flash_bwd, "HEAVY_BLOCKS", heavy)
    monkeypatch.setattr(flash_bwd, "HEAVY_SPLITS", 3)  # shares of several table rows
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=select_block,
                            num_selected=3, select_q_tile=64)
    q, k, v = _inputs(200, 8, 2, 16, 16, 3)
    rng = np.random.default_rng(3)
    n_blocks, n_tiles = -(-200 // select_block), -(-200 // 64)
    ids = np.full((1, 2, n_tiles, 3), -1, np.int32)
    counts = rng.integers(0, 4, (1, 2, n_tiles)).astype(np.int32)
    counts[0, 0, 0] = 0  # a tile that sees nothing writes zeros
    for h, i in np.ndindex(2, n_tiles):
        c = min(counts[0, h, i], n_blocks)
        counts[0, h, i] = c
        ids[0, h, i, :c] = np.sort(rng.choice(n_blocks, c, replace=False))
    sel = nsa_jax.BlockSparseIndices(jnp.asarray(ids), jnp.asarray(counts), q_tile=64,
                                     block_size=select_block)
    tilings = nsa_jax.MosaicTilings(selected=MosaicFlashConfig(block_k=block_k,
                                                               prefetch_q=prefetch_q),
                                    selected_dq=MosaicFlashConfig(block_k=dq_block_k,
                                                                  prefetch_q=prefetch_q),
                                    selected_dkv=MosaicFlashConfig())
    fn = jax.jit(lambda q, k, v: nsa_jax.selected_attention(q, k, v, sel, config=cfg,
                                                            tilings=tilings, **MOSAIC))
    assert _kernels(fn, q, k, v) == {"nsa_mosaic_flash_fwd"}
    names = _gradient_kernels(fn, q, k, v)
    assert {"nsa_mosaic_flash_bwd_dq", "nsa_mosaic_flash_bwd_dkv"} <= names
    assert not {"nsa_flash_bwd_dq", "nsa_flash_bwd_dkv"} & names
    _check(fn, lambda *a: reference.selected_attention(*a, sel, config=cfg), (q, k, v), 3,
           ("q", "k", "v"))


def test_selected_branch_defaults_and_takes_triton_tilings():
    """By default (measured faster) the selected branch runs the Mosaic forward and dQ and the
    Triton dK/dV; ``selected=None`` gives it the Triton forward; a `TritonTilings` given to
    "mosaic" tiles the Triton kernels it runs."""
    from nsa_jax import ops
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64,
                            num_selected=2, num_local=1, select_q_tile=64)
    q, k, v = _inputs(64, 4, 2, 16, 16, 7)
    sel = nsa_jax.BlockSparseIndices(jnp.zeros((1, 2, 1, 2), jnp.int32).at[..., 1].set(-1),
                                     jnp.ones((1, 2, 1), jnp.int32), q_tile=64, block_size=64)
    fn = lambda q, k, v: nsa_jax.selected_attention(q, k, v, sel, config=cfg, **MOSAIC)
    assert _kernels(fn, q, k, v) == {"nsa_mosaic_flash_fwd"}
    names = _gradient_kernels(fn, q, k, v)
    assert {"nsa_mosaic_flash_bwd_dq", "nsa_flash_bwd_dkv"} <= names
    assert not {"nsa_flash_bwd_dq", "nsa_mosaic_flash_bwd_dkv"} & names
    off = dataclasses.replace(nsa_jax.MosaicTilings(), selected=None)
    fn = lambda q, k, v: nsa_jax.selected_attention(q, k, v, sel, config=cfg, tilings=off,
                                                    **MOSAIC)
    assert _kernels(fn, q, k, v) == {"nsa_flash_fwd"}
    triton = nsa_jax.TritonTilings(window=nsa_jax.Tiling(rows=32))
    assert ops.get("mosaic").tilings_from(triton) == nsa_jax.MosaicTilings(triton=triton)


def test_calls_it_does_not_serve_run_the_triton_kernel():
    """float32, and per-token selection rows shorter than a CTA, take the Triton-lowered forward
    (same semantics)."""
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64, num_selected=4,
                            window=32)
    q, k, v = _inputs(70, 4, 2, 16, 16, 4, dtype=jnp.float32)
    fn = lambda q, k, v: nsa_jax.sliding_window_attention(q, k, v, config=cfg, **MOSAIC)
    assert _kernels(fn, q, k, v) == {"nsa_flash_fwd"}
    assert_close(fn(q, k, v), reference.sliding_window_attention(q, k, v, config=cfg),
                 FWD_TOL[jnp.float32], "o")


def test_whole_nsa_forward():
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64, num_selected=4,
                            window=32, select_q_tile=64)
    q, k, v = _inputs(130, 8, 2, 16, 16, 5)
    got = jax.jit(lambda q, k, v: nsa_jax.nsa_attention(q, k, v, config=cfg, **MOSAIC))(q, k, v)
    want = reference.nsa_attention(*upcast((q, k, v)), config=cfg)
    assert got.dtype == BF16
    assert_close(got, want, FWD_TOL[BF16], "o")


def _gradient_kernels(fn, *args):
    """The kernels the gradients of ``fn`` run (each name once)."""
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
    return set(re.findall(r"nsa_\w+", str(jax.make_jaxpr(jax.grad(loss, argnums=0))(*args))))


# The compressed branch at G = 16 with queries after earlier keys (the dK/dV kernel splits its
# rows into shares); the window at G = 4 with D != Dv and 128-key dQ blocks, causal or not;
# dQ's rows loaded a unit ahead (prefetch) in two of them.
@pytest.mark.parametrize("kernels,branch,T,HQ,H,D,Dv,S,block_k,causal", [
    ("dq+dkv", "compressed", 131, 16, 1, 16, 16, 203, 64, True),
    ("dq+dkv", "window", 150, 8, 2, 24, 72, None, 128, True),
    ("dq+dkv", "window", 133, 4, 1, 16, 16, None, 64, False),
    ("dq-prefetch", "compressed", 131, 16, 1, 16, 16, 203, 64, True),
    ("dq-prefetch+dkv", "window", 150, 8, 2, 24, 72, None, 64, True),
    ("dkv", "window", 133, 4, 1, 16, 16, None, 64, True)],
    ids=["both-compressed-G16-S>T", "both-window-G4-D24-Dv72", "both-window-noncausal",
         "dq-prefetch-compressed", "both-prefetch-window-D24-Dv72", "dkv-window"])
def test_backward_kernels(kernels, branch, T, HQ, H, D, Dv, S, block_k, causal):
    """The Mosaic GPU dQ and dK/dV kernels, alone (Triton for the other gradients) or together,
    against the float32 reference."""
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64,
                            num_selected=4, window=40, causal=causal)
    q, k, v = _inputs(T, HQ, H, D, Dv, 11, S=S)
    dq = MosaicFlashConfig(block_k=block_k, num_stages=2,
                           prefetch_q="prefetch" in kernels) if "dq" in kernels else None
    dkv = MosaicFlashConfig(num_stages=2) if "dkv" in kernels else None
    tilings = nsa_jax.MosaicTilings(compressed_dq=dq, window_dq=dq, compressed_dkv=dkv,
                                    window_dkv=dkv)
    kv_len = k.shape[1]
    if branch == "compressed":
        k, v = nsa_jax.compress(k, v, config=cfg)
        fn = lambda q, k, v: nsa_jax.compressed_attention(q, k, v, config=cfg, kv_len=kv_len,
                                                          tilings=tilings, **MOSAIC)[0]
        ref = lambda *a: reference.compressed_attention(*a, config=cfg, kv_len=kv_len)[0]
    else:
        fn = lambda q, k, v: nsa_jax.sliding_window_attention(q, k, v, config=cfg,
                                                              tilings=tilings, **MOSAIC)
        ref = lambda *a: reference.sliding_window_attention(*a, config=cfg)
    fn = jax.jit(fn)
    names = _gradient_kernels(fn, q, k, v)
    for part in ("dq", "dkv"):
        mosaic = part in kernels.replace("-prefetch", "").split("+")
        assert (f"nsa_mosaic_flash_bwd_{part}" in names) == mosaic
        assert (f"nsa_flash_bwd_{part}" in names) != mosaic
    _check(fn, ref, (q, k, v), 11, ("q", "k", "v"))


@pytest.mark.skipif(ON_GPU, reason="the Mosaic GPU interpreter's race detector runs on CPU")
def test_backward_kernels_have_no_shared_memory_races(monkeypatch):
    """Three CTAs taking several units each, warpgroups with different ranges (a 40-key window
    over 64-key blocks): dQ written out through the Q buffers, or (``prefetch_q``) through its
    own buffer while its last store may be in flight; dK/dV's row ring, split rows and output
    slices. (wgmma's reads are not tracked: early reuse of a row buffer shows in values, which
    `test_backward_kernels` checks.)"""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from nsa_jax import metadata
    from nsa_jax.kernels.common import BlockTable, MaskRule, ReverseTable
    from nsa_jax.kernels.mosaic_gpu import flash_bwd
    from nsa_jax.kernels.mosaic_gpu.flash_bwd import flash_backward_dkv, flash_backward_dq
    from nsa_jax.kernels.mosaic_gpu.flash_fwd import flash_forward
    q, k, v = _inputs(150, 8, 2, 64, 64, 12)
    rule, offsets = MaskRule(num_keys=150, window=40), jnp.zeros((1,), jnp.int32)
    o, lse = flash_forward(q, k, v, offsets, rule=rule, scale=0.125, config=MosaicFlashConfig(),
                           interpret=True)
    for kernel, prefetch_q in ((flash_backward_dq, False), (flash_backward_dq, True),
                               (flash_backward_dkv, False)):
        grads = kernel(q, k, v, o, lse, o, None, offsets, rule=rule, scale=0.125,
                       config=MosaicFlashConfig(num_stages=2, prefetch_q=prefetch_q),
                       interpret=plgpu.InterpretGPUParams(detect_races=True))
        jax.block_until_ready(grads)
        assert not interpret_pallas_call.get_races().races_found, (kernel.__name__, prefetch_q)
    # Walking a table: dK/dV with both warpgroups on one block, ring slots owned in turn and the
    # most listed block in shares; dQ with its rows a unit ahead.
    monkeypatch.setattr(flash_bwd, "HEAVY_BLOCKS", 1)
    sel = nsa_jax.BlockSparseIndices(jnp.array([[[[0, 2], [1, -1], [0, 1]]] * 2], jnp.int32),
                                     jnp.array([[[2, 1, 2]] * 2], jnp.int32), q_tile=64,
                                     block_size=64)
    rev = metadata.reverse_map(sel, 3)
    rule = MaskRule(num_keys=150)
    blocks = BlockTable(sel.indices, sel.counts, q_tile=64)
    o, lse = flash_forward(q, k, v, offsets, rule=rule, scale=0.125, config=MosaicFlashConfig(),
                           blocks=blocks, interpret=True)
    grads = flash_backward_dkv(q, k, v, o, lse, o, None, offsets, rule=rule, scale=0.125,
                               config=MosaicFlashConfig(num_stages=2), blocks=blocks,
                               reverse=ReverseTable(rev.tiles, rev.offsets),
                               interpret=plgpu.InterpretGPUParams(detect_races=True))
    jax.block_until_ready(grads)
    assert not interpret_pallas_call.get_races().races_found, "dkv table"
    dq = flash_backward_dq(q, k, v, o, lse, o, None, offsets, rule=rule, scale=0.125,
                           config=MosaicFlashConfig(prefetch_q=True), blocks=blocks,
                           interpret=plgpu.InterpretGPUParams(detect_races=True))
    jax.block_until_ready(dq)
    assert not interpret_pallas_call.get_races().races_found, "dq table"


def _scoring_inputs(T, HQ, H, D, qt, S, seed, causal=True):
    cfg = nsa_jax.NSAConfig(compress_block=32, compress_stride=16, select_block=64, num_selected=3,
                            select_q_tile=qt, window=32, causal=causal)
    q, k, v = _inputs(T, HQ, H, D, D, seed, S=S)
    k_c, v_c = nsa_jax.compress(k, v, config=cfg)
    _, lse = nsa_jax.compressed_attention(q, k_c, v_c, config=cfg, kv_len=k.shape[1], **MOSAIC)
    return cfg, q, k_c, lse


# G = 4 with D padded to 64 channels; G = 16 with queries after earlier keys, four CTAs per
# selection tile; G = 1 with 64-row products; G = 3 (padded to 4) with 16-query tiles; 374
# compressed tokens (six key blocks per unit, masked and whole, the ring and the Q buffers
# reused across units); no causal rule. Odd lengths throughout.
@pytest.mark.parametrize("T,HQ,H,D,qt,S,rows,causal", [
    (150, 4, 1, 24, 64, None, 256, True), (131, 16, 1, 16, 32, 203, 128, True),
    (201, 2, 2, 16, 64, 1100, 64, True), (131, 6, 2, 16, 16, None, 256, True),
    (150, 8, 2, 32, 64, 6000, 256, True), (133, 4, 2, 16, 32, None, 128, False)],
    ids=["G4-D24", "G16-S>T", "G1", "G3", "six-blocks", "noncausal"])
def test_scoring_kernel_against_the_reference(T, HQ, H, D, qt, S, rows, causal):
    """The compressed mass per tile, mapped onto selection blocks, against the float32
    reference's block scores; the Triton kernel's mass; reruns bit-identical. Under the
    interpreter the output starts as NaN, so a block inside a CTA's range left unwritten fails
    (those outside it are cleared by design)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from nsa_jax.kernels.mosaic_gpu.block_scores import MosaicScoringConfig, compressed_mass
    from nsa_jax.kernels.triton import block_scores as triton_scores
    from nsa_jax.kernels.triton.flash_fwd import FlashConfig
    from nsa_jax.ops import selection, triton as tri
    cfg, q, k_c, lse = _scoring_inputs(T, HQ, H, D, qt, S, 8, causal)
    S = S or T
    offsets = tri.key_offsets(1, T, S)
    args = dict(rule=tri.compressed_rule(cfg, k_c.shape[1]), scale=cfg.softmax_scale(D), q_tile=qt)
    interpret = False if ON_GPU else plgpu.InterpretGPUParams(uninitialized_memory="nan")
    fn = jax.jit(lambda q, k_c, lse: compressed_mass(
        q, k_c, lse, offsets, config=MosaicScoringConfig(rows=rows), interpret=interpret, **args))
    mass = fn(q, k_c, lse)
    assert _kernels(fn, q, k_c, lse) == {"nsa_mosaic_compressed_mass"}
    scores = selection.block_scores(mass, cfg, -(-S // cfg.select_block))
    want = reference.block_scores(*upcast((q, k_c)), config=cfg, kv_len=S)
    assert_close(scores, want, 1e-2, "block scores")  # lse and products from bf16 kernels
    triton_mass = triton_scores.compressed_mass(q, k_c, lse, offsets, config=FlashConfig(),
                                                interpret=not ON_GPU, **args)
    assert_close(mass, triton_mass, 1e-5, "mass")
    assert_bit_identical(fn(q, k_c, lse), mass)


def test_selection_runs_the_scoring_kernel_where_it_serves(monkeypatch):
    """Tiled selection in bf16 scores with the Mosaic GPU kernel and selects as the reference
    does, in one pass or a chunk per tile; per-token selection and float32 score with the Triton
    kernels."""
    from nsa_jax.ops import triton as tri
    cfg, q, k_c, lse = _scoring_inputs(200, 8, 2, 16, 64, None, 9)
    fn = lambda q, k_c, lse: nsa_jax.select_blocks(q, k_c, config=cfg, lse=lse, **MOSAIC)
    assert _kernels(fn, q, k_c, lse) == {"nsa_mosaic_compressed_mass", "nsa_tile_top_blocks"}
    ref = reference.select_blocks(*upcast((q, k_c)), config=cfg)
    whole = fn(q, k_c, lse)
    assert_same_selection(whole, ref, reference.block_scores(*upcast((q, k_c)), config=cfg))
    # One 64-query CTA per tile: a tile's partials are one row of N_c sums per KV head.
    monkeypatch.setattr(tri, "MASS_BYTES", 2 * k_c.shape[1] * 4)
    jax.clear_caches()
    chunked = fn(q, k_c, lse)
    jax.clear_caches()
    np.testing.assert_array_equal(np.asarray(chunked.indices), np.asarray(whole.indices))
    np.testing.assert_array_equal(np.asarray(chunked.counts), np.asarray(whole.counts))
    per_token = dataclasses.replace(cfg, select_q_tile=1)
    assert "nsa_mosaic_compressed_mass" not in _kernels(
        lambda q, k_c: nsa_jax.select_blocks(q, k_c, config=per_token, **MOSAIC), q, k_c)
    q32, k_c32 = upcast((q, k_c))
    assert _kernels(fn, q32, k_c32, lse) == {"nsa_compressed_mass", "nsa_tile_top_blocks"}


@pytest.mark.skipif(ON_GPU, reason="the Mosaic GPU interpreter's race detector runs on CPU")
def test_scoring_kernel_has_no_shared_memory_races():
    """Three CTAs taking several units each: Q/lse double buffers, the key ring shared by the
    two compute warpgroups in turn, and each warpgroup's two output buffers."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from nsa_jax.kernels.common import MaskRule
    from nsa_jax.kernels.mosaic_gpu.block_scores import MosaicScoringConfig, compressed_mass
    q, k, _ = _inputs(150, 8, 2, 64, 64, 10, S=300)
    lse = jnp.full((1, 150, 8), 4.0, jnp.float32)
    mass = compressed_mass(q, k, lse, jnp.array([150], jnp.int32),
                           rule=MaskRule(num_keys=300, window=100), scale=0.125, q_tile=32,
                           config=MosaicScoringConfig(rows=64),
                           interpret=plgpu.InterpretGPUParams(detect_races=True))
    mass.block_until_ready()
    assert not interpret_pallas_call.get_races().races_found


@pytest.mark.skipif(ON_GPU, reason="the Mosaic GPU interpreter's race detector runs on CPU")
@pytest.mark.parametrize("table,prefetch_q,o_in_q", [
    (False, False, False), (True, False, False), (False, True, False), (True, True, False),
    (False, True, True), (True, True, True)])
def test_no_shared_memory_races(monkeypatch, table, prefetch_q, o_in_q):
    """The interpreter's happens-before race detector on a window walk (warpgroups with
    different ranges, ping-pong meetings) and a table walk, three CTAs taking several units
    each; Q and O in one buffer, or (``prefetch_q``) an output buffer reused while its last
    store may be in flight, or (``o_in_q``: shared memory made too small for O's own buffers)
    the output leaving through a prefetched Q buffer that goes back to the memory warpgroup
    once its store has read it. The detector does not see wgmma's reads, so a Q buffer
    overwritten too early is caught by values instead: with ``prefetch_q`` the table walk has
    units of zero or one KV block (little time between a buffer's last read and its reload),
    and the output must equal the one without prefetch bit for bit."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from nsa_jax.kernels.common import BlockTable, MaskRule
    from nsa_jax.kernels.mosaic_gpu import flash_fwd
    from nsa_jax.kernels.mosaic_gpu.flash_fwd import flash_forward
    if o_in_q:
        # At D = Dv = 64, 2 stages of 64 keys: 66,048 bytes with O in Q's buffers, 82,432 with
        # buffers of its own (and `SMEM_SLACK` for the compiler's).
        monkeypatch.setattr(flash_fwd, "SMEM_BYTES", 80_000)
    q, k, v = _inputs(150, 8, 2, 64, 64, 6)
    blocks = None
    if table and prefetch_q:
        ids = jnp.array([[[[0], [1], [2]], [[2], [0], [1]]]], jnp.int32)  # [1, 2, 3, 1]
        blocks = BlockTable(ids, jnp.array([[[1, 0, 1], [0, 1, 1]]], jnp.int32), q_tile=64)
    elif table:
        ids = jnp.array([[[[0, 2], [1, -1], [0, 1]]] * 2], jnp.int32)  # [1, 2, 3, 2]
        blocks = BlockTable(ids, jnp.array([[[2, 1, 2]] * 2], jnp.int32), q_tile=64)
    run = lambda prefetch_q, interpret: flash_forward(
        q, k, v, jnp.zeros((1,), jnp.int32), rule=MaskRule(num_keys=150, window=0 if table else 40),
        scale=0.125, config=MosaicFlashConfig(prefetch_q=prefetch_q), blocks=blocks,
        interpret=interpret)
    o, _ = run(prefetch_q, plgpu.InterpretGPUParams(detect_races=True))
    o.block_until_ready()
    assert not interpret_pallas_call.get_races().races_found
    if prefetch_q:
        assert_bit_identical(o, run(False, True)[0])


@pytest.mark.parametrize("field,value,match,error", [
    ("block_k", 32, "block_k=32 must be 64 or 128", ValueError),
    ("num_stages", 1, "num_stages=1 must be", ValueError),
    ("prefetch_q", 1, "prefetch_q=1 must be a bool", TypeError),
    ("pingpong", "yes", "pingpong='yes' must be a bool", TypeError)])
def test_config_validation(field, value, match, error):
    with pytest.raises(error, match=match):
        MosaicFlashConfig(**{field: value})
    with pytest.raises(TypeError, match="MosaicTilings.window must be a MosaicFlashConfig"):
        nsa_jax.MosaicTilings(window=nsa_jax.Tiling())
    assert dataclasses.replace(nsa_jax.MosaicTilings(), window=MosaicFlashConfig(block_k=128))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rows=96), "rows=96 must be 64, 128 or 256"),
    (dict(num_stages=3), "num_stages=3 must be an even int"),
    (dict(num_ctas=0), "num_ctas=0 must be a positive int")])
def test_scoring_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nsa_jax.MosaicScoringConfig(**kwargs)
    with pytest.raises(TypeError, match="MosaicTilings.scoring must be a MosaicScoringConfig"):
        nsa_jax.MosaicTilings(scoring=MosaicFlashConfig())
    with pytest.raises(TypeError, match="MosaicTilings.window_dq must be a MosaicFlashConfig or "
                                        "None"):
        nsa_jax.MosaicTilings(window_dq=nsa_jax.MosaicScoringConfig())
    with pytest.raises(ValueError, match="MosaicTilings.window_dkv.block_k=128 must be 64"):
        nsa_jax.MosaicTilings(window_dkv=MosaicFlashConfig(block_k=128))
    with pytest.raises(TypeError, match="MosaicTilings.scoring_small_groups must be a "
                                        "MosaicScoringConfig or None, got int"):
        nsa_jax.MosaicTilings(scoring_small_groups=2)
    assert nsa_jax.MosaicTilings(scoring=None).scoring is None


def test_scoring_tiling_by_group():
    small, wide = nsa_jax.MosaicScoringConfig(num_stages=2), nsa_jax.MosaicScoringConfig()
    t = nsa_jax.MosaicTilings(scoring=wide, scoring_small_groups=small)
    assert [t.scoring_for(G) for G in (1, 3, 4, 5, 16)] == [small] * 3 + [wide] * 2
    assert dataclasses.replace(t, scoring_small_groups=None).scoring_for(4) is wide
    assert dataclasses.replace(t, scoring=None).scoring_for(4) is None


def test_kernels_lower_for_an_h200():
    """Each Mosaic GPU kernel at the benchmark's head width and group (D = 128, G = 16) lowers
    for CUDA under an abstract H200 at its default tiling (the backward kernels at the tilings
    they are meant to run with): layouts, shared memory and barriers are checked before any GPU
    sees them."""
    from jax.sharding import AbstractDevice, AbstractMesh
    from nsa_jax.kernels.common import BlockTable, MaskRule, ReverseTable
    from nsa_jax.kernels.mosaic_gpu.block_scores import MosaicScoringConfig, compressed_mass
    from nsa_jax.kernels.mosaic_gpu.flash_bwd import flash_backward_dkv, flash_backward_dq
    from nsa_jax.kernels.mosaic_gpu.flash_fwd import flash_forward
    T, H, G, D, N_c = 1024, 2, 16, 128, 64
    arr = jax.ShapeDtypeStruct
    q, k, k_c = arr((1, T, G * H, D), BF16), arr((1, T, H, D), BF16), arr((1, N_c, H, D), BF16)
    lse, offsets = arr((1, T, G * H), jnp.float32), arr((1,), jnp.int32)
    window = MaskRule(num_keys=T, window=512)
    compressed = MaskRule(num_keys=N_c, key_stride=16, key_offset=31)
    tilings = nsa_jax.MosaicTilings()
    calls = {
        "forward": (lambda q, k, off: flash_forward(q, k, k, off, rule=window, scale=0.1,
                                                    config=tilings.window), (q, k, offsets)),
        "forward-no-prefetch": (lambda q, k, off: flash_forward(
            q, k, k, off, rule=window, scale=0.1,
            config=dataclasses.replace(tilings.window, prefetch_q=False)), (q, k, offsets)),
        "forward-compressed": (lambda q, k_c, off: flash_forward(
            q, k_c, k_c, off, rule=compressed, scale=0.1, config=tilings.compressed),
            (q, k_c, offsets)),
        # 128-key blocks with prefetch: the output leaves through the Q buffers.
        "forward-prefetch-128": (lambda q, k, off: flash_forward(
            q, k, k, off, rule=window, scale=0.1,
            config=MosaicFlashConfig(block_k=128, prefetch_q=True)), (q, k, offsets)),
        "scoring": (lambda q, k_c, lse, off: compressed_mass(
            q, k_c, lse, off, rule=compressed, scale=0.1, q_tile=64,
            config=MosaicScoringConfig()), (q, k_c, lse, offsets)),
    }
    for block_k, stages, prefetch_q in ((64, 2, False), (128, 2, False), (64, 2, True)):
        calls[f"dq-{block_k}/{stages}/{prefetch_q}"] = (lambda q, k, lse, off, c=MosaicFlashConfig(
            block_k=block_k, num_stages=stages, prefetch_q=prefetch_q): flash_backward_dq(
                q, k, k, q, lse, q, None, off, rule=window, scale=0.1, config=c),
            (q, k, lse, offsets))
    for stages in (2, 4):
        calls[f"dkv-{stages}"] = (lambda q, k, lse, off, c=MosaicFlashConfig(
            num_stages=stages): flash_backward_dkv(
                q, k, k, q, lse, q, None, off, rule=window, scale=0.1, config=c),
            (q, k, lse, offsets))
    n_tiles, n_sel, n_kb = T // 64, 16, T // 64
    table_args = (arr((1, H, n_tiles, n_sel), jnp.int32), arr((1, H, n_tiles), jnp.int32),
                  arr((1, H, n_tiles * n_sel), jnp.int32), arr((1, H, n_kb + 1), jnp.int32))
    full = MaskRule(num_keys=T)
    table = lambda ids, counts: BlockTable(ids, counts, q_tile=64)
    calls["dkv-table"] = (lambda q, k, lse, off, ids, counts, tiles, starts: flash_backward_dkv(
        q, k, k, q, lse, q, None, off, rule=full, scale=0.1, config=MosaicFlashConfig(),
        blocks=table(ids, counts), reverse=ReverseTable(tiles, starts)),
        (q, k, lse, offsets, *table_args))
    for name, config in (("dq-table-prefetch", MosaicFlashConfig(prefetch_q=True)),
                         ("dq-table", tilings.selected_dq)):
        calls[name] = (lambda q, k, lse, off, ids, counts, c=config: flash_backward_dq(
            q, k, k, q, lse, q, None, off, rule=full, scale=0.1, config=c,
            blocks=table(ids, counts)), (q, k, lse, offsets, *table_args[:2]))
    calls["forward-table"] = (lambda q, k, off, ids, counts: flash_forward(
        q, k, k, off, rule=full, scale=0.1, config=tilings.selected, blocks=table(ids, counts)),
        (q, k, offsets, *table_args[:2]))
    h200 = AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=h200)):
        for name, (fn, args) in calls.items():
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert "mosaic_gpu" in text, name


def test_configs_over_shared_memory_are_refused():
    """A tiling whose buffers exceed a multiprocessor's shared memory at these widths is refused
    before lowering, naming the config."""
    from nsa_jax.kernels.common import MaskRule
    from nsa_jax.kernels.mosaic_gpu.flash_bwd import flash_backward_dq
    from nsa_jax.kernels.mosaic_gpu.flash_fwd import flash_forward
    q, k, v = _inputs(128, 2, 1, 128, 128, 14)
    args = (q, k, v, jnp.zeros((1,), jnp.int32))
    kw = dict(rule=MaskRule(num_keys=128), scale=0.1, interpret=True)
    with pytest.raises(ValueError, match=r"MosaicFlashConfig\(block_k=128, num_stages=4.* needs "
                                         r"\d+ bytes of shared memory at D=128, Dv=128"):
        flash_forward(*args, config=MosaicFlashConfig(block_k=128, num_stages=4), **kw)
    with pytest.raises(ValueError, match="prefetch_q=True.* needs"):
        flash_backward_dq(q, k, v, q, jnp.zeros((1, 128, 2)), q, None, args[3],
                          config=MosaicFlashConfig(block_k=128, prefetch_q=True), **kw)


def test_dkv_kernel_refuses_other_blocks():
    from nsa_jax.kernels.common import MaskRule
    from nsa_jax.kernels.mosaic_gpu.flash_bwd import flash_backward_dkv
    q, k, v = _inputs(8, 2, 1, 16, 16, 13)
    for config, match in ((MosaicFlashConfig(block_k=128),
                           "takes block_k=64 .* got MosaicFlashConfig.block_k=128"),
                          (MosaicFlashConfig(prefetch_q=True), "has no prefetch_q")):
        with pytest.raises(ValueError, match=match):
            flash_backward_dkv(q, k, v, q, jnp.zeros((1, 8, 2)), q, None,
                               jnp.zeros((1,), jnp.int32), rule=MaskRule(num_keys=8), scale=0.25,
                               config=config, interpret=True)
    with pytest.raises(ValueError, match="window_dkv.prefetch_q=True: the dK/dV kernel has no"):
        nsa_jax.MosaicTilings(window_dkv=MosaicFlashConfig(prefetch_q=True))
    with pytest.raises(ValueError, match="selected_dkv.num_stages=3 must be even"):
        nsa_jax.MosaicTilings(selected_dkv=MosaicFlashConfig(num_stages=3))


def test_backward_kernels_with_rows_offsets_and_shares(monkeypatch):
    """Both backward kernels against the Triton ones on what the branch tests leave out: two
    batch rows at different offsets, G = 3, D != Dv, three stages, a nonzero lse cotangent, rows
    without a visible key (lse = -inf), and the dK/dV rows cut into four shares of two tiles
    or fewer."""
    from nsa_jax.kernels.common import MaskRule
    from nsa_jax.kernels.mosaic_gpu import flash_bwd
    from nsa_jax.kernels.mosaic_gpu.flash_fwd import flash_forward
    from nsa_jax.kernels.triton.flash_bwd import flash_backward
    from nsa_jax.kernels.triton.flash_fwd import FlashConfig
    monkeypatch.setattr(flash_bwd, "DKV_UNITS_PER_SM", 1000)
    monkeypatch.setattr(flash_bwd, "DKV_MIN_SHARE", 1)
    ks = jax.random.split(jax.random.key(14), 5)
    T, N, HQ, H, D, Dv = 70, 260, 6, 2, 24, 40
    q, do = normal(ks[0], (2, T, HQ, D), BF16), normal(ks[3], (2, T, HQ, Dv), BF16)
    k, v = normal(ks[1], (2, N, H, D), BF16), normal(ks[2], (2, N, H, Dv), BF16)
    dlse = normal(ks[4], (2, T, HQ))
    # Compressed-token positions: row 1 starts before the first token, so early rows see none.
    rule = MaskRule(num_keys=N, key_stride=2, key_offset=31, window=200)
    offsets = jnp.array([300, 10], jnp.int32)
    cfg = MosaicFlashConfig(num_stages=3)
    o, lse = flash_forward(q, k, v, offsets, rule=rule, scale=0.2, config=cfg,
                           interpret=not ON_GPU)
    assert bool(jnp.any(jnp.isneginf(lse)))
    args = (q, k, v, o, lse, do, dlse, offsets)
    want = flash_backward(*args, rule=rule, scale=0.2, config=FlashConfig(block_q=16, block_k=32),
                          interpret=not ON_GPU)
    got = (flash_bwd.flash_backward_dq(*args, rule=rule, scale=0.2, config=cfg,
                                       interpret=not ON_GPU),
           *flash_bwd.flash_backward_dkv(*args, rule=rule, scale=0.2, config=cfg,
                                         interpret=not ON_GPU))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_close(g, w, 1e-2, name)


@pytest.mark.parametrize("rule_args", [
    dict(num_keys=300), dict(num_keys=300, window=150), dict(num_keys=300, causal=False),
    dict(num_keys=300, causal=False, window=150), dict(num_keys=100, key_stride=4, key_offset=7),
    dict(num_keys=130, key_stride=2, key_offset=31, window=200)],
    ids=["causal", "window", "noncausal", "noncausal-window", "strided", "strided-window"])
def test_dkv_unmasked_tiles_are_exactly_those_that_see_every_key(rule_args):
    """The dK/dV kernel skips the mask on the row tiles `_full_tiles` names: each of them must
    see all 64 keys of its block, and (for speed) every such tile should be named."""
    from nsa_jax.kernels.common import MaskRule, visible
    from nsa_jax.kernels.mosaic_gpu.flash_bwd import _full_tiles
    rule = MaskRule(**rule_args)
    for key0, offset in itertools.product((0, 64, 128, 256), (0, 37, 300)):
        f_lo, f_hi = (int(x) for x in _full_tiles(rule, jnp.int32(key0), jnp.int32(offset), 16))
        for t in range(60):
            q_pos = offset + t * 16 + jnp.arange(16)
            every = bool(visible(rule, q_pos, key0, 64).all())
            assert (f_lo <= t < f_hi) == every, (key0, offset, t, f_lo, f_hi)
