"""Batch-sharded inputs under `jax.make_mesh`, with JAX 0.11's default explicit axes and with auto
axes, on every implementation (four forced host devices on a CPU, see conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


# Batch axis alone: the Pallas kernels, packed rows and auto axes once each (the meshes below
# combine it with the other axes).
CASES = [pytest.param("triton", False, AxisType.Explicit, id="triton-rows-explicit"),
         pytest.param("xla", True, AxisType.Explicit, id="xla-packed-explicit"),
         pytest.param("xla", False, AxisType.Auto, id="xla-rows-auto")]


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


def _mesh(axes: dict, axis_type=AxisType.Explicit):
    n = int(np.prod(list(axes.values())))
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(axis_type,) * len(axes),
                         devices=jax.devices()[:n])


def _run(cfg, impl, axes=None, params=None, seg=None, return_selection=False):
    """jit(value_and_grad) of a squared-output loss of nsa_attention, with the selection."""

    def loss(q, k, v, g, params, seg):
        out = nsa_jax.nsa_attention(q, k, v, g, config=cfg, compress_params=params,
                                    segment_ids=seg, mesh_axes=axes,
                                    return_selection=return_selection,
                                    **ALL_IMPLEMENTATIONS[impl])
        o, sel = out if return_selection else (out, None)
        return (o.astype(jnp.float32) ** 2).sum(), (o, sel)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


# (mesh axes and sizes, MeshAxes fields): each parallelism alone and combined.
LAYOUTS = {
    "heads": ({"model": 2}, dict(heads="model")),
    "context": ({"seq": 2}, dict(context="seq")),
    "context4-zigzag": ({"seq": 4}, dict(context="seq", layout="zigzag")),
    "batch-context": ({"data": 2, "seq": 2}, dict(batch="data", context="seq")),
    "heads-context-zigzag": ({"model": 2, "seq": 2}, dict(heads="model", context="seq",
                                                          layout="zigzag")),
}
# Kept to what the CPU suite can afford: each axis and layout at least once, combined meshes,
# explicit and auto axes, every implementation (the Triton kernels run in interpret mode here).
# Heads alone: test_head_parallel_splits_per_head_compression; contiguous context alone:
# test_context_parallel_with_query_tiles.
PARALLEL_CASES = [
    ("xla", "batch-context", AxisType.Explicit),
    ("xla", "heads-context-zigzag", AxisType.Explicit),
    ("xla", "context4-zigzag", AxisType.Auto),
    ("reference", "heads-context-zigzag", AxisType.Auto),
    ("triton", "heads-context-zigzag", AxisType.Explicit),
]
PARALLEL_CASES = [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2].name.lower()}")
                  for c in PARALLEL_CASES]


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs four devices")
@pytest.mark.parametrize("impl,layout,axis_type", PARALLEL_CASES)
def test_mesh_parallel_equals_one_device(impl, layout, axis_type):
    """T=56 is no multiple of any block (14 queries per zig-zag chunk); "mlp" compression has
    parameters, replicated, whose gradients must be summed over every device."""
    cfg = nsa_jax.NSAConfig(select_q_tile=1, compress_method="mlp", **CFG)
    _check_parallel(cfg, impl, layout, axis_type, T=56)


# Packed rows over the context axis: documents straddle devices (T=128 over 2 or 4 devices), one
# is a single token, one row ends in padding; per-token and 16-query tiles. One block is forced
# (the local one) and one chosen by the scores, sharpened (q and k times 3), so a tile that a
# device edge cuts selects wrongly unless it sees all its queries.
PACKED_CASES = [
    pytest.param("xla", "batch-context", 1, id="xla-batch-context-qt1"),
    pytest.param("xla", "context4-zigzag", 16, id="xla-context4-zigzag-qt16"),
    pytest.param("reference", "heads-context-zigzag", 16, id="reference-heads-context-zigzag"),
    pytest.param("triton", "context", 16, id="triton-context-qt16"),
]


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs four devices")
@pytest.mark.parametrize("impl,layout,q_tile", PACKED_CASES)
def test_packed_documents_context_parallel_equal_one_device(impl, layout, q_tile):
    cfg = nsa_jax.NSAConfig(**{**CFG, "num_selected": 2, "num_initial": 0, "num_local": 1},
                            select_q_tile=q_tile, compress_method="mlp")
    seg = nsa_jax.segment_ids_from_cu_seqlens(
        jnp.array([[0, 8, 128, 128, 128], [0, 20, 21, 90, 120]]), 128)
    _check_parallel(cfg, impl, layout, AxisType.Explicit, T=128, seg=seg, sharpen=3.0)


def _check_parallel(cfg, impl, layout, axis_type, *, T, seg=None, sharpen=1.0):
    """Forward, every gradient and (unpacked) the selection on the mesh of ``layout`` equal the
    single-device call's; ``sharpen`` scales q and k."""
    sizes, fields = LAYOUTS[layout]
    axes = nsa_jax.MeshAxes(**fields)
    q, k, v, g = _inputs(T=T)
    q, k = q * sharpen, k * sharpen
    params = nsa_jax.init_compress_params(jax.random.key(7), cfg, 2, 16, 8)
    selection = seg is None
    (_, (want, want_sel)), want_grads = _run(cfg, impl, return_selection=selection)(
        q, k, v, g, params, seg)
    n = sizes.get("seq", 1)
    order = ((lambda x: nsa_jax.zigzag(x, n)) if axes.layout == "zigzag" else (lambda x: x))
    back = ((lambda x: nsa_jax.unzigzag(np.asarray(x), n)) if axes.layout == "zigzag"
            else np.asarray)
    explicit = axis_type == AxisType.Explicit
    # Explicit axes are read from the inputs' types; only the layout is told.
    told = nsa_jax.MeshAxes(layout=axes.layout) if explicit else axes
    mesh = _mesh(sizes, axis_type)
    spec = P(axes.batch, axes.context, axes.heads, None)
    with jax.set_mesh(mesh):
        put = lambda x, spec=spec: jax.device_put(order(x), NamedSharding(mesh, spec))
        (_, (out, sel)), grads = _run(cfg, impl, told, return_selection=selection)(
            put(q), put(k), put(v), put(g), params,
            None if seg is None else put(seg, P(*spec[:2])))
    if explicit:
        assert jax.typeof(out).sharding.spec == spec
    assert_close(back(out), want, FWD_TOL[jnp.float32], "o")
    for name, got, w in zip("q k v g".split(), grads[:4], want_grads[:4]):
        assert_close(back(got), w, GRAD_TOL[jnp.float32], f"d{name}")
    # Parameter gradients sum over every token; some are near zero (b2 behind a zero w2), so
    # they are held to the largest parameter gradient's scale.
    scale = max(float(jnp.abs(w).max()) for w in want_grads[4].values())
    for name in want_grads[4]:
        np.testing.assert_allclose(grads[4][name], want_grads[4][name], rtol=0,
                                   atol=GRAD_TOL[jnp.float32] * scale, err_msg=f"d{name}")
    if selection:  # per-token: the tile axis is the token axis
        np.testing.assert_array_equal(back(sel.indices.transpose(0, 2, 1, 3)),
                                      np.asarray(want_sel.indices.transpose(0, 2, 1, 3)))


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs four devices")
def test_packed_context_parallel_room_is_checked():
    """The row fits the default layout (224 of 256 aligned rows), but device 0's 32 tokens are 8
    documents needing 128 rows where its window holds 80: an error naming max_segments."""
    cfg = nsa_jax.NSAConfig(select_q_tile=1, **CFG)
    q, k, v, g = _inputs(T=128)
    seg = jnp.concatenate([jnp.repeat(jnp.arange(1, 9), 4), jnp.full(96, 9)])[None].repeat(2, 0)
    mesh = _mesh({"seq": 4})
    with jax.set_mesh(mesh):
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "seq")))
        with pytest.raises(Exception, match="window holds 80.*max_segments"):
            jax.block_until_ready(nsa_jax.nsa_attention(
                put(q), put(k), put(v), put(g), config=cfg, segment_ids=put(seg),
                implementation="xla"))


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two devices")
def test_context_parallel_with_query_tiles():
    """select_q_tile=16: each device's 32 queries are two whole tiles of the single-device call."""
    cfg = nsa_jax.NSAConfig(select_q_tile=16, **CFG)
    args = _inputs(T=64)
    (_, (want, want_sel)), want_grads = _run(cfg, "xla", return_selection=True)(*args, None, None)
    mesh = _mesh({"seq": 2})
    with jax.set_mesh(mesh):
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "seq")))
        (_, (out, sel)), grads = _run(cfg, "xla", return_selection=True)(*map(put, args), None,
                                                                          None)
    assert_close(out, want, FWD_TOL[jnp.float32], "o")
    for name, got, w in zip("q k v g".split(), grads, want_grads):
        assert_close(got, w, GRAD_TOL[jnp.float32], f"d{name}")
    np.testing.assert_array_equal(np.asarray(sel.indices), np.asarray(want_sel.indices))
    np.testing.assert_array_equal(np.asarray(sel.counts), np.asarray(want_sel.counts))


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs four devices")
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_packed_documents_batch_and_head_parallel(impl):
    cfg = nsa_jax.NSAConfig(select_q_tile=1, **CFG)
    q, k, v, g = _inputs(T=50)
    seg = nsa_jax.segment_ids_from_cu_seqlens(jnp.array([[0, 20, 45], [0, 50, 50]]), 50)
    (_, (want, _)), want_grads = _run(cfg, impl)(q, k, v, g, None, seg)
    mesh = _mesh({"data": 2, "model": 2})
    with jax.set_mesh(mesh):
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data", None, "model")))
        seg_s = jax.device_put(seg, NamedSharding(mesh, P("data")))
        (_, (out, _)), grads = _run(cfg, impl)(put(q), put(k), put(v), put(g), None, seg_s)
    assert jax.typeof(out).sharding.spec == P("data", None, "model", None)
    assert_close(out, want, FWD_TOL[jnp.float32], "o")
    for name, got, w in zip("q k v g".split(), grads[:4], want_grads[:4]):
        assert_close(got, w, GRAD_TOL[jnp.float32], f"d{name}")


def test_zigzag_order_and_its_inverse():
    x = np.arange(2 * 12).reshape(2, 12)
    z = nsa_jax.zigzag(x, 3)
    # Chunks of 2 tokens: device i of 3 holds chunks i and 5 - i.
    np.testing.assert_array_equal(z[0], [0, 1, 10, 11, 2, 3, 8, 9, 4, 5, 6, 7])
    np.testing.assert_array_equal(nsa_jax.unzigzag(z, 3), x)
    np.testing.assert_array_equal(nsa_jax.unzigzag(nsa_jax.zigzag(jnp.asarray(x), 3), 3), x)
    with pytest.raises(ValueError, match="multiple of 2n"):
        nsa_jax.zigzag(x, 4)


def _refusal(sizes, spec, cfg=None, T=56, seg=None, axes=None, **kw):
    cfg = cfg or nsa_jax.NSAConfig(select_q_tile=1, **CFG)
    q, k, v, g = _inputs(T=T)
    mesh = _mesh(sizes)
    with jax.set_mesh(mesh):
        put = lambda x, spec=spec: jax.device_put(x, NamedSharding(mesh, spec))
        nsa_jax.nsa_attention(put(q), put(k), put(v), put(g, P(*spec[:3])), config=cfg,
                              segment_ids=seg,
                              mesh_axes=axes, implementation="xla", **kw)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs four devices")
@pytest.mark.parametrize("case,match", [
    (dict(sizes={"seq": 2}, spec=P(None, "seq"),
          cfg=nsa_jax.NSAConfig(causal=False, select_q_tile=1, **CFG)), "'seq'.*causal=True"),
    (dict(sizes={"seq": 4}, spec=P(None, "seq"), T=52,
          axes=nsa_jax.MeshAxes(layout="zigzag")), "T=52 is not a multiple of 8.*'seq'"),
    (dict(sizes={"seq": 2}, spec=P(None, "seq"), T=48,
          cfg=nsa_jax.NSAConfig(select_q_tile=16, **CFG)), "24 queries.*select_q_tile=16"),
    (dict(sizes={"model": 4}, spec=P(), axes=nsa_jax.MeshAxes(heads="model")),
     "H \\(KV heads\\)=2.*'model'"),
    (dict(sizes={"model": 2}, spec=P(None, None, None, "model")), "D axis.*'model'"),
    (dict(sizes={"seq": 2}, spec=P(), axes=nsa_jax.MeshAxes(context="sequence")),
     "'sequence' is not an axis"),
], ids=["noncausal-context", "zigzag-length", "query-tile", "heads-divide",
        "head-dim", "unknown-axis"])
def test_unsupported_layouts_name_the_axis(case, match):
    with pytest.raises(ValueError, match=match):
        _refusal(**case)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs four devices")
def test_mesh_axes_validation():
    with pytest.raises(ValueError, match="needs the mesh"):
        q, k, v, g = _inputs()
        nsa_jax.nsa_attention(q, k, v, g, config=nsa_jax.NSAConfig(**CFG),
                              mesh_axes=nsa_jax.MeshAxes(batch="data"))
    with pytest.raises(TypeError, match="MeshAxes.heads"):
        nsa_jax.MeshAxes(heads=3)
    with pytest.raises(ValueError, match="layout"):
        nsa_jax.MeshAxes(layout="ring")
    with pytest.raises(ValueError, match="one dimension only"):
        nsa_jax.MeshAxes(batch="x", context=("x", "y"))
    with pytest.raises(TypeError, match="mesh_axes must be"):
        nsa_jax.nsa_attention(*_inputs(), config=nsa_jax.NSAConfig(**CFG), mesh_axes={"x": 1})
    mixed = jax.make_mesh((2, 2), ("a", "b"), axis_types=(AxisType.Explicit, AxisType.Auto),
                          devices=jax.devices()[:4])
    with jax.set_mesh(mixed), pytest.raises(ValueError, match="mix axis types"):
        nsa_jax.nsa_attention(*_inputs(), config=nsa_jax.NSAConfig(**CFG),
                              mesh_axes=nsa_jax.MeshAxes(batch="a", heads="b"))


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs four devices")
def test_layer_with_partitioned_kernels_runs_head_and_context_parallel():
    """Tensor parallel by the parameters' partitioning (query/key/value kernels split over their
    heads, the out kernel over its input heads) and context parallel by the input's sharding:
    the layer's output and parameter gradients equal the unsharded layer's."""
    from flax import nnx
    cfg = nsa_jax.NSAConfig(select_q_tile=1, **CFG)
    init = nnx.initializers.lecun_normal()
    heads_split = nnx.with_partitioning(init, (None, "model", None))
    out_split = nnx.with_partitioning(init, ("model", None, None))
    make = lambda **kw: nsa_jax.NSAAttention(4, 32, num_kv_heads=2, config=cfg,
                                             implementation="xla", rngs=nnx.Rngs(0), **kw)
    x = normal(jax.random.key(1), (2, 48, 32))

    def loss(layer, x, out_sharding=None):
        return (layer(x, out_sharding=out_sharding) ** 2).sum()

    plain = make(kernel_init=init)
    want, want_grads = nnx.value_and_grad(loss)(plain, x)
    mesh = _mesh({"model": 2, "seq": 2})
    with jax.set_mesh(mesh):
        layer = make(kernel_init=heads_split, out_kernel_init=out_split)
        assert jax.typeof(layer.key.kernel[...]).sharding.spec == P(None, "model", None)
        xs = jax.device_put(x, NamedSharding(mesh, P(None, "seq")))
        step = nnx.jit(nnx.value_and_grad(lambda l, x: loss(l, x, P(None, "seq"))))
        got, grads = step(layer, xs)
    assert_close(got, want, FWD_TOL[jnp.float32], "loss")
    for (path, g), (_, w) in zip(nnx.to_flat_state(nnx.state(grads)),
                                 nnx.to_flat_state(nnx.state(want_grads))):
        assert_close(g[...], w[...], GRAD_TOL[jnp.float32], "/".join(map(str, path)))


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs four devices")
def test_demo_trains_data_and_context_parallel():
    """`nsa-jax demo --devices 4`'s training steps (2-way data x 2-way context) give the
    single-device losses."""
    import dataclasses

    import optax
    from flax import nnx

    from nsa_jax.tools import demo

    def losses(cfg):
        task = demo.make_task(cfg)
        model = demo.RetrievalModel(task.vocab_size, cfg, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
        return [float(demo._train_step(model, opt, jax.random.key(i), task, cfg.batch_size)[0])
                for i in range(2)]

    cfg = dataclasses.replace(demo.DemoConfig(), seq_len=512, batch_size=4, implementation="xla")
    want = losses(cfg)
    cfg4 = dataclasses.replace(cfg, devices=4)
    assert demo.mesh_shape(cfg4) == (2, 2)
    with jax.set_mesh(_mesh({"data": 2, "seq": 2})):
        got = losses(cfg4)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two devices")
def test_head_parallel_splits_per_head_compression():
    """"linear" compression has one matrix per KV head: it is split with the heads."""
    cfg = nsa_jax.NSAConfig(select_q_tile=1, compress_method="linear", **CFG)
    _check_parallel(cfg, "xla", "heads", AxisType.Explicit, T=56)


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs four devices")
# "xla" only here: the Triton kernels in interpret mode take over a minute for it on a CPU, and
# the shard_map around the step is the same for every implementation.
@pytest.mark.parametrize("impl", ["xla"])
def test_decode_with_cache_sharded_over_batch_and_heads(impl):
    """A ragged prefill then one step, with q, k, v, g and the cache split 2-way over B and
    2-way over the KV heads: outputs and cache equal the single-device ones."""
    cfg = nsa_jax.NSAConfig(select_q_tile=1, compress_method="linear", **CFG)
    B, H, D, Dv = 4, 2, 16, 8
    params = nsa_jax.init_compress_params(jax.random.key(3), cfg, H, D, Dv)
    prompt = _inputs(B=B, T=37)
    step = _inputs(B=B, T=1)
    num_new = jnp.array([37, 20, 5, 30], jnp.int32)
    run = jax.jit(lambda *a, **kw: nsa_jax.nsa_decode(
        *a, config=cfg, compress_params=params, **ALL_IMPLEMENTATIONS[impl], **kw))

    def generate(put=lambda x: x):
        cache = jax.tree.map(put, nsa_jax.init_cache(B, 60, H, D, Dv, config=cfg))
        o1, cache = run(*map(put, prompt), cache, num_new=put(num_new))
        o2, cache = run(*map(put, step), cache)
        return o1, o2, cache

    want = generate()
    mesh = _mesh({"data": 2, "model": 2})
    with jax.set_mesh(mesh):
        got = generate(lambda x: jax.device_put(x, NamedSharding(
            mesh, P("data", None, "model") if x.ndim == 4 else P("data"))))
    assert jax.typeof(got[2].k).sharding.spec == P("data", None, "model", None)
    for name, a, w in zip(("o1", "o2", "k", "v", "k_c", "v_c", "lengths"),
                          jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close(a, w, FWD_TOL[jnp.float32], name)
    seq = _mesh({"seq": 2})
    with jax.set_mesh(seq):
        put = lambda x: jax.device_put(x, NamedSharding(seq, P(None, "seq")))
        with pytest.raises(ValueError, match="'seq' shards T"):
            nsa_jax.nsa_decode(*map(put, _inputs(B=B, T=2)),
                               nsa_jax.init_cache(B, 60, H, D, Dv, config=cfg), config=cfg,
                               compress_params=params, implementation="xla")
