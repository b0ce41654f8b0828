"""Generation: the cache, incremental compression and `nsa_decode` against one full forward.

Teacher forcing: a prefill of each row's prompt, then single-token steps, must give at every
position what the reference's forward over the whole sequence gives there. The small config puts
a compressed block end every 8 tokens (blocks of 16), a selection block boundary every 16 and the
window edge at 20, so a 70-token run crosses each many times; prompts of 3 (shorter than one
block), 16 and 21 tokens give rows of different lengths in one batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALL_IMPLEMENTATIONS, FWD_TOL, IMPLEMENTATIONS, ON_GPU, assert_close, normal
from flax import nnx

import nsa_jax
from nsa_jax import reference
from nsa_jax.compression import init_params
from nsa_jax.decode import append, init_cache, nsa_decode

CFG = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4,
                        num_initial=1, num_local=2, window=20)
PROMPTS = (3, 16, 21)


def inputs(key, B, T, HQ, H, D, Dv, dtype=jnp.float32):
    ks = jax.random.split(key, 4)
    return (normal(ks[0], (B, T, HQ, D), dtype), normal(ks[1], (B, T, H, D), dtype),
            normal(ks[2], (B, T, H, Dv), dtype),
            jax.nn.sigmoid(normal(ks[3], (B, T, HQ, 3))).astype(dtype))


def perturbed_params(key, cfg, H, D, Dv):
    """phi's parameters moved off their mean-pooling start, so each method differs."""
    params = init_params(key, cfg, H, D, Dv)
    if not params:
        return None
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])


def at_rows(x, pos):
    """x [B, T, ...] at one position per row -> [B, 1, ...]."""
    return jnp.take_along_axis(x, pos.reshape(-1, 1, *([1] * (x.ndim - 2))), axis=1)


def teacher_forced(q, k, v, g, cfg, params, prompts, steps, max_length, impl, dtype=None):
    """Outputs of a ragged prefill then ``steps`` jitted single-token steps, per row as a list
    of [n_b, HQ, Dv] arrays, and the final cache."""
    B, P = q.shape[0], max(prompts)
    cache = init_cache(B, max_length, k.shape[2], k.shape[3], v.shape[3], config=cfg,
                       dtype=dtype or q.dtype)
    n = jnp.asarray(prompts, jnp.int32)
    o, cache = nsa_decode(q[:, :P], k[:, :P], v[:, :P], g[:, :P], cache, config=cfg,
                          compress_params=params, num_new=n, **impl)
    rows = [[o[b, :prompts[b]]] for b in range(B)]
    step = jax.jit(lambda q, k, v, g, c: nsa_decode(q, k, v, g, c, config=cfg,
                                                   compress_params=params, **impl))
    for _ in range(steps):
        pos = cache.lengths
        o, cache = step(*(at_rows(x, pos) for x in (q, k, v, g)), cache)
        for b in range(B):
            rows[b].append(o[b])
    return [jnp.concatenate(r) for r in rows], cache


@pytest.mark.parametrize("method", ["mean", "linear", "mlp"])
@pytest.mark.parametrize("HQ,H", [(2, 2), (8, 2), (16, 1)], ids=["G1", "G4", "G16"])
def test_teacher_forcing_xla(method, HQ, H):
    cfg = dataclasses.replace(CFG, compress_method=method)
    B, T, D, Dv = 3, 70, 16, 24
    q, k, v, g = inputs(jax.random.key(HQ + H), B, T, HQ, H, D, Dv)
    params = perturbed_params(jax.random.key(7), cfg, H, D, Dv)
    full = reference.nsa_attention(q, k, v, g, config=cfg, compress_params=params)
    steps = T - max(PROMPTS)
    rows, cache = teacher_forced(q, k, v, g, cfg, params, PROMPTS, steps, T,
                                 IMPLEMENTATIONS["xla"])
    for b, out in enumerate(rows):
        n = PROMPTS[b] + steps
        assert_close(out, full[b, :n], FWD_TOL[jnp.float32], f"row {b}")
    np.testing.assert_array_equal(cache.lengths, [p + steps for p in PROMPTS])
    # The cache holds what a full compression gives for each row's complete blocks, zeros after.
    k_c, v_c = nsa_jax.compress(k, v, config=cfg, params=params)
    for b in range(B):
        n_c = cfg.num_compressed(int(cache.lengths[b]))
        assert_close(cache.k_c[b, :n_c], k_c[b, :n_c], 1e-5, "k_c")
        assert_close(cache.v_c[b, :n_c], v_c[b, :n_c], 1e-5, "v_c")
        assert not np.asarray(cache.k_c[b, n_c:]).any()
        assert not np.asarray(cache.k[b, int(cache.lengths[b]):]).any()


@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS if i != "xla"])
def test_teacher_forcing_kernels(impl):
    """The Pallas backends on the same walk (fewer steps on CPU: interpret mode is slow)."""
    B, T, HQ, H, D, Dv = 3, 40, 8, 2, 16, 24
    dtype = jnp.bfloat16 if ON_GPU else jnp.float32
    cfg = dataclasses.replace(CFG, compress_method="linear")
    q, k, v, g = inputs(jax.random.key(3), B, T, HQ, H, D, Dv, dtype)
    params = perturbed_params(jax.random.key(8), cfg, H, D, Dv)
    full = reference.nsa_attention(q, k, v, g, config=cfg, compress_params=params)
    steps = T - max(PROMPTS) if ON_GPU else 4
    rows, _ = teacher_forced(q, k, v, g, cfg, params, PROMPTS, steps, T, IMPLEMENTATIONS[impl])
    for b, out in enumerate(rows):
        assert_close(out, full[b, :PROMPTS[b] + steps], FWD_TOL[dtype], f"{impl} row {b}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("impl", list(ALL_IMPLEMENTATIONS))
def test_branches_with_per_row_kv_len(impl, causal):
    """selected_attention and sliding_window_attention with kv_len: each row equals the branch
    over its first kv_len keys alone (an int, and an int32[B] of different lengths)."""
    cfg = dataclasses.replace(CFG, causal=causal)
    B, T, S, HQ, H, D = 3, 5, 70, 4, 2, 16
    q, k, v, _ = inputs(jax.random.key(14), B, S, HQ, H, D, D)
    q = q[:, :T]
    n = jnp.asarray([5, 40, 63], jnp.int32)
    sel = reference.select_blocks(q, nsa_jax.compress(k, v, config=cfg)[0], config=cfg,
                                  kv_len=n if causal else S)
    row_sel = lambda b: nsa_jax.BlockSparseIndices(sel.indices[b:b + 1], sel.counts[b:b + 1],
                                                   q_tile=1, block_size=cfg.select_block)
    kw = ALL_IMPLEMENTATIONS[impl]
    for name, fn, alone in (
            ("window", lambda kv_len, **a: nsa_jax.sliding_window_attention(
                q, k, v, config=cfg, kv_len=kv_len, **a),
             lambda b: reference.sliding_window_attention(q[b:b + 1], k[b:b + 1, :n[b]],
                                                          v[b:b + 1, :n[b]], config=cfg)),
            ("selected", lambda kv_len, **a: nsa_jax.selected_attention(
                q, k, v, sel, config=cfg, kv_len=kv_len, **a),
             lambda b: reference.selected_attention(q[b:b + 1], k[b:b + 1, :n[b]],
                                                    v[b:b + 1, :n[b]], row_sel(b), config=cfg))):
        if impl in ("triton", "mosaic") and not causal:  # the Triton kernels, or Mosaic's
            with pytest.raises(NotImplementedError, match="with a per-row kv_len"):
                fn(n, **kw)
            continue
        o = fn(n, **kw)
        for b in range(B):
            assert_close(o[b:b + 1], alone(b), FWD_TOL[jnp.float32], f"{name} row {b}")
        o = fn(40, **kw)
        assert_close(o[1:2], alone(1), FWD_TOL[jnp.float32], f"{name} int kv_len")
    with pytest.raises(ValueError, match=r"kv_len=\[5, 40, 71\] must lie in"):
        nsa_jax.sliding_window_attention(q, k, v, config=cfg, kv_len=n.at[2].set(71), **kw)


def test_reference_decode_matches_forward():
    B, T, HQ, H, D = 2, 30, 4, 2, 16
    q, k, v, g = inputs(jax.random.key(13), B, T, HQ, H, D, D)
    full = reference.nsa_attention(q, k, v, g, config=CFG)
    rows, _ = teacher_forced(q, k, v, g, CFG, None, (3, 21), 9, T, {"implementation": "reference"})
    for b, out in enumerate(rows):
        assert_close(out, full[b, :out.shape[0]], FWD_TOL[jnp.float32], f"row {b}")


def test_bf16_cache_matches_forward():
    B, T, HQ, H, D = 2, 48, 4, 2, 32
    q, k, v, g = inputs(jax.random.key(4), B, T, HQ, H, D, D, jnp.bfloat16)
    full = reference.nsa_attention(q, k, v, g, config=CFG)
    rows, cache = teacher_forced(q, k, v, g, CFG, None, (5, 30), T - 30, T,
                                 IMPLEMENTATIONS["xla"])
    assert cache.k.dtype == jnp.bfloat16
    for b, out in enumerate(rows):
        assert_close(out, full[b, :out.shape[0]], FWD_TOL[jnp.bfloat16], f"row {b}")


def test_chunked_prefill_equals_one_prefill_and_tiles_align():
    """Prefill in chunks of whole selection tiles gives the forward's outputs, tile-shared
    selection included."""
    cfg = dataclasses.replace(CFG, select_q_tile=8, num_selected=5)
    B, T, HQ, H, D = 2, 64, 4, 2, 16
    q, k, v, g = inputs(jax.random.key(5), B, T, HQ, H, D, D)
    full = reference.nsa_attention(q, k, v, g, config=cfg)
    cache = init_cache(B, 80, H, D, config=cfg)
    step = jax.jit(lambda *a: nsa_decode(*a, config=cfg, implementation="xla"))
    outs = []
    for start in range(0, T, 24):
        sl = slice(start, start + 24)
        o, cache = step(q[:, sl], k[:, sl], v[:, sl], g[:, sl], cache)
        outs.append(o)
    assert_close(jnp.concatenate(outs, axis=1), full, FWD_TOL[jnp.float32], "chunks")
    whole, cache1 = step(q, k, v, g, init_cache(B, 80, H, D, config=cfg))
    assert_close(whole, full, FWD_TOL[jnp.float32], "one prefill")
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(cache1)):
        assert_close(a, b, 1e-6, "cache")


def test_unfilled_slots_never_reach_outputs():
    """Unfilled cache slots poisoned with NaN change nothing, and writes never copy them into
    compressed tokens."""
    B, T, HQ, H, D = 3, 40, 4, 2, 16
    q, k, v, g = inputs(jax.random.key(6), B, T, HQ, H, D, D)
    full = reference.nsa_attention(q, k, v, g, config=CFG)
    cache = init_cache(B, 48, H, D, config=CFG)
    P = max(PROMPTS)
    _, cache = nsa_decode(q[:, :P], k[:, :P], v[:, :P], g[:, :P], cache, config=CFG,
                          num_new=jnp.asarray(PROMPTS, jnp.int32), implementation="xla")

    def poison(x, n):
        return jnp.where((jnp.arange(x.shape[1]) < n[:, None])[:, :, None, None], x, jnp.nan)

    n_c = jnp.maximum((cache.lengths - CFG.compress_block) // CFG.compress_stride + 1, 0)
    cache = dataclasses.replace(cache, k=poison(cache.k, cache.lengths),
                                v=poison(cache.v, cache.lengths), k_c=poison(cache.k_c, n_c),
                                v_c=poison(cache.v_c, n_c))
    step = jax.jit(lambda *a: nsa_decode(*a, config=CFG, implementation="xla"))
    for _ in range(12):
        pos = cache.lengths
        o, cache = step(*(at_rows(x, pos) for x in (q, k, v, g)), cache)
        assert_close(o[:, 0], jnp.take_along_axis(full, pos[:, None, None, None], 1)[:, 0],
                     FWD_TOL[jnp.float32], "poisoned cache")
    for b in range(B):
        filled = CFG.num_compressed(int(cache.lengths[b]))
        assert not np.isnan(np.asarray(cache.k_c[b, :filled])).any()
        assert not np.isnan(np.asarray(cache.v_c[b, :filled])).any()
        assert not np.isnan(np.asarray(cache.k[b, :int(cache.lengths[b])])).any()


def test_one_compilation_serves_every_length():
    traces = []

    @jax.jit
    def step(q, k, v, g, cache):
        traces.append(1)
        return nsa_decode(q, k, v, g, cache, config=CFG, implementation="xla")

    B, HQ, H, D = 2, 4, 2, 16
    q, k, v, g = inputs(jax.random.key(9), B, 1, HQ, H, D, D)
    cache = init_cache(B, 64, H, D, config=CFG)
    cache = dataclasses.replace(cache, lengths=jnp.asarray([0, 37], jnp.int32))
    for _ in range(20):
        _, cache = step(q, k, v, g, cache)
    assert len(traces) == 1
    np.testing.assert_array_equal(cache.lengths, [20, 57])


def test_append_compresses_only_completed_blocks():
    """Token i appears exactly when key i * d + l - 1 is written."""
    cfg = dataclasses.replace(CFG, compress_method="mean")
    B, H, D = 1, 1, 4
    cache = init_cache(B, 40, H, D, config=cfg)
    k = jnp.arange(40, dtype=jnp.float32)[None, :, None, None] * jnp.ones((1, 1, H, D))
    filled = []
    for t in range(40):
        cache = append(cache, k[:, t:t + 1], k[:, t:t + 1], config=cfg)
        filled.append(int((cache.k_c[0, :, 0, 0] != 0).sum()))
    expected = [cfg.num_compressed(t + 1) for t in range(40)]
    # Token 0 is the mean of keys 0..15 = 7.5 (never zero), so counting non-zeros counts tokens.
    assert filled == expected
    np.testing.assert_allclose(cache.k_c[0, :4, 0, 0], [7.5 + 8 * i for i in range(4)])
    assert not np.asarray(cache.k_c[0, 4:]).any()


def test_layer_decode_matches_forward_under_nnx_jit():
    layer = nsa_jax.NSAAttention(4, 32, num_kv_heads=2, config=CFG, implementation="xla",
                                 rngs=nnx.Rngs(0))
    x = normal(jax.random.key(10), (2, 45, 32))
    full = layer(x)
    layer.init_cache((2, 48, 32))
    first = layer(x[:, :17], decode=True)
    step = nnx.jit(lambda layer, x: layer(x, decode=True))
    rest = [step(layer, x[:, t:t + 1]) for t in range(17, 45)]
    assert_close(jnp.concatenate([first, *rest], axis=1), full, FWD_TOL[jnp.float32], "layer")
    np.testing.assert_array_equal(layer.cache.get_value().lengths, [45, 45])


def test_greedy_generation_loop_matches_full_forwards():
    """examples/train_lm.py's jitted prefill + scan generation equals greedy decoding by
    re-running the whole model on the growing sequence."""
    import pathlib
    import runpy
    ns = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "examples" / "train_lm.py"))
    cfg = nsa_jax.NSAConfig(compress_block=16, compress_stride=8, select_block=16,
                            num_selected=4, window=16)
    model = ns["LM"](32, 32, 2, 4, 2, cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(11), (2, 21), 0, 32)
    generated = ns["generate"](model, prompt, 12)
    # Causal: one forward over prompt + generated tokens holds every greedy step's logits.
    logits = model(jnp.concatenate([prompt, generated], axis=1))
    np.testing.assert_array_equal(generated, jnp.argmax(logits[:, 20:-1], axis=-1))


def test_decode_errors():
    B, HQ, H, D = 1, 2, 1, 8
    q, k, v, g = inputs(jax.random.key(12), B, 1, HQ, H, D, D)
    cache = init_cache(B, 8, H, D, config=CFG)
    with pytest.raises(ValueError, match="causal"):
        nsa_decode(q, k, v, g, cache, config=dataclasses.replace(CFG, causal=False))
    assert cache.max_length == 128  # rounded up to whole kernel blocks
    with pytest.raises(ValueError, match=r"cache.k has shape \(1, 128, 1, 8\).*\(1, 128, 1, 16\)"):
        q2, k2, v2, _ = inputs(jax.random.key(1), B, 1, HQ, H, 16, 16)
        nsa_decode(q2, k2, v2, None, cache, config=CFG)
    full = dataclasses.replace(cache, lengths=jnp.asarray([128], jnp.int32))
    with pytest.raises(ValueError, match=r"lengths \[128\] \+ T=1 exceed max_length=128"):
        nsa_decode(q, k, v, g, full, config=CFG)
    with pytest.raises(ValueError, match="another config"):
        nsa_decode(q, k, v, g, init_cache(B, 40, H, D, config=CFG), config=dataclasses.replace(
            CFG, compress_stride=16, compress_block=32, select_block=16))
    with pytest.raises(TypeError, match="NSACache"):
        nsa_decode(q, k, v, g, {"k": 1}, config=CFG)
    with pytest.raises(ValueError, match="same T new tokens"):
        nsa_decode(q, *inputs(jax.random.key(2), B, 3, HQ, H, D, D)[1:3], g, cache, config=CFG)
    with pytest.raises(TypeError, match="num_new must be an int32"):
        nsa_decode(q, k, v, g, cache, config=CFG, num_new=jnp.asarray([1.0]))
    with pytest.raises(ValueError, match=r"num_new=\[2\] must lie in \[0, T=1\]"):
        nsa_decode(q, k, v, g, cache, config=CFG, num_new=jnp.asarray([2]))
    with pytest.raises(TypeError, match=r"cache.k.dtype=float32 differs from q.dtype=bfloat16"):
        nsa_decode(*(x.astype(jnp.bfloat16) for x in (q, k, v, g)), cache, config=CFG)
    layer = nsa_jax.NSAAttention(2, 8, config=CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache"):
        layer(jnp.ones((1, 1, 8)), decode=True)
    layer.init_cache((1, 16, 8))
    with pytest.raises(ValueError, match="max_segments"):
        layer(jnp.ones((1, 1, 8)), decode=True, max_segments=2)
    with pytest.raises(ValueError, match="in_features=8"):
        layer.init_cache((1, 16, 9))
