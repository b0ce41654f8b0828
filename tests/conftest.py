"""Shared fixtures: implementations under test, tolerances, random inputs, comparison helpers."""

from __future__ import annotations

import os

# Scatter-adds in XLA's GPU gradients use atomics unless asked not to; tests demand bit-identical
# reruns, as users who need reproducible "xla" gradients on GPU should (see README). Four host
# devices let the sharding tests build meshes on a CPU; computations elsewhere use the first.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true"
                           " --xla_force_host_platform_device_count=4").strip()

import chex  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import nsa_jax  # noqa: E402
from nsa_jax.metadata import BlockSparseIndices  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"
# The CPU suite spends most of its time compiling small programs that then run for milliseconds.
# Without XLA's backend (LLVM) optimisations the same operations compile a third faster and run
# slower, which these shapes do not notice.
if not ON_GPU:
    jax.config.update("jax_disable_most_optimizations", True)

# Every implementation the suite compares with the reference, as keyword arguments. On CPU the
# Pallas kernels run in interpret mode, on small shapes only. Interpret mode fills kernel outputs
# with NaN before the kernel runs (`test_interpret_mode_poisons_outputs`), so an element a kernel
# fails to write fails `assert_close`.
IMPLEMENTATIONS = {
    "xla": dict(implementation="xla"),
    "triton": dict(implementation="triton", interpret=not ON_GPU),
}
# The Mosaic GPU interpreter takes seconds per kernel call, so on CPU "mosaic" is checked by
# tests/test_mosaic.py alone; on a GPU it runs the whole suite.
if ON_GPU:
    IMPLEMENTATIONS["mosaic"] = dict(implementation="mosaic")
# With the reference itself: for hand-computed cases, edge cases and refusals.
ALL_IMPLEMENTATIONS = {"reference": dict(implementation="reference"), **IMPLEMENTATIONS}

# Max error allowed, as a fraction of the reference's largest magnitude.
FWD_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2.5e-2, jnp.float16: 4e-3}
GRAD_TOL = {jnp.float32: 5e-5, jnp.bfloat16: 5e-2, jnp.float16: 8e-3}

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))


def normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def upcast(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        tree)


def assert_close(actual, expected, tol: float, name: str = ""):
    """max |actual - expected| <= tol * max(|expected|, 1e-2); NaN anywhere fails.

    The floor keeps results that are zero in exact arithmetic but sums of O(1) float32 terms
    (e.g. the gradient of a softmax over one key) from being held below float32 rounding.
    """
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    chex.assert_equal_shape([actual, expected], custom_message=name)
    assert not np.isnan(actual).any(), f"{name}: NaN in result"
    assert not np.isnan(expected).any(), f"{name}: NaN in reference"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-2)
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} * {scale:.3g}"


def assert_bit_identical(a, b):
    """Same tree structure, shapes, dtypes and bits (NaN equal to NaN)."""
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    chex.assert_trees_all_equal(a, b)


def make_cfg(**overrides):
    kw = dict(compress_block=32, compress_stride=16, select_block=64, num_selected=8,
              num_initial=1, num_local=2, window=0, scale=1.0)
    kw.update(overrides)
    return nsa_jax.NSAConfig(**kw)


def block_mask(sets, n):
    """Rows of block-id sets -> bool [len(sets), n]; lets expected masks read as id sets."""
    out = np.zeros((len(sets), n), bool)
    for r, s in enumerate(sets):
        out[r, sorted(s)] = True
    return out


def piecewise(spans):
    """[(length, row), ...] -> rows repeated `length` times, so per-token tables stay short."""
    return np.concatenate([np.tile(np.asarray(row)[None], (n,) + (1,) * np.ndim(row))
                           for n, row in spans])


def i32(x):
    return np.array(x, np.int32)


def bsi(indices, counts, q_tile=1, block_size=64):
    return BlockSparseIndices(jnp.asarray(indices, jnp.int32), jnp.asarray(counts, jnp.int32),
                              q_tile=q_tile, block_size=block_size)


def identity(f):
    return f


WRAPS = [pytest.param(identity, id="eager"), pytest.param(jax.jit, id="jit")]


def assert_same_selection(sel, ref_sel, scores):
    """Selections must match exactly, except between blocks whose reference scores tie to within
    float32 rounding (then either choice is correct)."""
    assert sel.indices.shape == ref_sel.indices.shape
    assert (sel.q_tile, sel.block_size) == (ref_sel.q_tile, ref_sel.block_size)
    ids, ref_ids = np.asarray(sel.indices), np.asarray(ref_sel.indices)
    np.testing.assert_array_equal(np.asarray(sel.counts), np.asarray(ref_sel.counts))
    scores = np.asarray(scores)
    for idx in zip(*np.nonzero((ids != ref_ids).any(-1))):
        a, b = set(ids[idx]) - {-1}, set(ref_ids[idx]) - {-1}
        only = sorted(a ^ b)
        row = scores[idx]
        spread = row[only].max() - row[only].min()
        assert spread <= 1e-5 * max(1.0, np.abs(row).max()), (
            f"selection differs at {idx}: {sorted(a)} vs {sorted(b)}, scores {row[only]}")
