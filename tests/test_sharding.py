"""Batch-sharded inputs under `jax.make_mesh`, with JAX 0.11's default explicit axes and with auto
axes, on every implementation (four forced host devices on a CPU, see conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nsa_jax
from conftest import ALL_IMPLEMENTATIONS, FWD_TOL, GRAD_TOL, assert_close, normal

CFG = dict(compress_block=16, compress_stride=8, select_block=16, num_selected=3, window=10)


def _inputs(B=2, T=50):
    ks = jax.random.split(jax.random.key(0), 4)
    return (normal(ks[0], (B, T, 4, 16)), normal(ks[1], (B, T, 2, 16)), normal(ks[2], (B, T, 2, 8)),
            jax.nn.sigmoid(normal(ks[3], (B, T, 4, 3))))


# Explicit axes (JAX 0.11's default) for every implementation, packed or not; auto axes once.
CASES = [pytest.param(impl, packed, AxisType.Explicit, id=f"{impl}-{kind}-explicit")
         for impl in ALL_IMPLEMENTATIONS for packed, kind in ((False, "rows"), (True, "packed"))]
CASES.append(pytest.param("xla", False, AxisType.Auto, id="xla-rows-auto"))


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two devices")
@pytest.mark.parametrize("impl,packed,axis_type", CASES)
def test_batch_sharded_forward_and_gradients(impl, packed, axis_type):
    cfg = nsa_jax.NSAConfig(select_q_tile=1 if packed else 16, **CFG)
    args = _inputs()
    seg = (nsa_jax.segment_ids_from_cu_seqlens(jnp.array([[0, 20, 45], [0, 50, 50]]), 50)
           if packed else None)

    def loss(q, k, v, g, seg):
        o = nsa_jax.nsa_attention(q, k, v, g, config=cfg, segment_ids=seg,
                                  **ALL_IMPLEMENTATIONS[impl])
        return (o.astype(jnp.float32) ** 2).sum(), o

    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, want), want_grads = run(*args, seg)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(axis_type,), devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        put = lambda x: None if x is None else jax.device_put(x, NamedSharding(mesh, P("data")))
        (_, out), grads = run(*map(put, args), put(seg))
    assert out.sharding.spec[0] == "data"
    assert_close(out, want, FWD_TOL[jnp.float32], "o")
    for name, g, w in zip("q k v g".split(), grads, want_grads):
        assert_close(g, w, GRAD_TOL[jnp.float32], f"d{name}")
