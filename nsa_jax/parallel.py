"""NSA over a device mesh: data, head and context parallel (docs/design.md §5.6).

`nsa_attention` comes here when its inputs are sharded over mesh axes: read from the arrays'
types under explicit axes, named by ``mesh_axes`` under auto axes. The whole computation runs in
one `jax.shard_map`, so XLA's partitioner never has to place a kernel:

- batch: rows are independent;
- heads: each device holds whole KV heads with their query groups; nothing is communicated;
- context: each device holds a slice of the queries (one contiguous run, or the zig-zag pair of
  chunks i and 2N-1-i of 2N). Keys and values are all-gathered over the axis and compressed on
  every device; the device's queries then attend with per-row key lengths, exactly as a decode
  step over a cache does (`api.attend_with_lengths`), so the result is the single-device one.
  Gradients of the gathered keys come back by the all-gather's transpose, a reduce-scatter.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from nsa_jax import segments
from nsa_jax.compression import compress_checked
from nsa_jax.config import NSAConfig
from nsa_jax.metadata import BlockSparseIndices

LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """The mesh axes `nsa_attention`'s inputs are sharded over (each None, an axis name or a
    tuple of names).

    Attributes:
      batch: axes of B (data parallel).
      heads: axes of HQ and H together (head parallel): device j holds KV heads [j H/N, (j+1)
        H/N) and their query heads.
      context: axes of T (context parallel; causal self-attention, S == T).
      layout: how T lies over the context axes: "contiguous" (device i holds tokens [i T/N,
        (i+1) T/N)) or "zigzag" (device i holds chunks i and 2N-1-i of 2N equal chunks, which
        balances causal work; `zigzag` puts a sequence in that order).
    """

    batch: str | tuple[str, ...] | None = None
    heads: str | tuple[str, ...] | None = None
    context: str | tuple[str, ...] | None = None
    layout: str = "contiguous"

    def __post_init__(self):
        for field in ("batch", "heads", "context"):
            value = getattr(self, field)
            names = value if isinstance(value, tuple) else (value,)
            if value is not None and not (names and all(isinstance(n, str) for n in names)):
                raise TypeError(f"MeshAxes.{field} must be None, a mesh axis name or a tuple of "
                                f"names, got {value!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"MeshAxes.layout={self.layout!r} must be one of {LAYOUTS}")
        used = [n for f in ("batch", "heads", "context") for n in _names(getattr(self, f))]
        if len(used) != len(set(used)):
            raise ValueError(f"a mesh axis may shard one dimension only: {self}")

    def any(self) -> bool:
        return any(x is not None for x in (self.batch, self.heads, self.context))


def _names(axes) -> tuple[str, ...]:
    return () if axes is None else axes if isinstance(axes, tuple) else (axes,)


def _size(mesh, axes) -> int:
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return math.prod(sizes[n] for n in _names(axes))


def _spec_axes(entry):
    """One PartitionSpec entry as None, a name, or a tuple of several."""
    if entry is None or isinstance(entry, str):
        return entry
    entry = tuple(entry)
    return None if not entry else entry[0] if len(entry) == 1 else entry


def from_types(q, layout: str = "contiguous") -> MeshAxes | None:
    """The axes q [B, T, HQ, D] is sharded over under explicit mesh axes (None if none), with
    ``layout`` for the context axis (which types cannot tell)."""
    sharding = getattr(jax.typeof(q), "sharding", None)
    spec = tuple(getattr(sharding, "spec", ()) or ())
    spec = [_spec_axes(e) for e in spec + (None,) * (4 - len(spec))]
    if spec[3] is not None:
        raise ValueError(f"q's D axis is sharded over mesh axis {spec[3]!r}: NSA shards B "
                         f"(batch), T (context) or HQ (heads), not D")
    axes = MeshAxes(batch=spec[0], context=spec[1], heads=spec[2], layout=layout)
    return axes if axes.any() else None


def zigzag(x, n: int, axis: int = 1):
    """``x`` with its ``axis`` (length T, a multiple of 2n) in zig-zag order: chunks 0, 2n-1, 1,
    2n-2, ... of T/(2n) tokens, so that sharding the result evenly over n devices gives device i
    chunks i and 2n-1-i (`MeshAxes(layout="zigzag")`). Apply it to tokens, positions and segment
    ids alike; `unzigzag` undoes it."""
    return _reorder(x, n, axis, _zigzag_order(n))


def unzigzag(x, n: int, axis: int = 1):
    """The inverse of `zigzag`: natural order from zig-zag order."""
    return _reorder(x, n, axis, np.argsort(_zigzag_order(n)))


def _zigzag_order(n: int) -> np.ndarray:
    return np.array([c for i in range(n) for c in (i, 2 * n - 1 - i)])


def _reorder(x, n: int, axis: int, order):
    """NumPy in, NumPy out (a data pipeline's arrays); anything else as a jax array."""
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.asarray(x)
    axis = axis % x.ndim
    T = x.shape[axis]
    if not isinstance(n, int) or n < 1 or T % (2 * n):
        raise ValueError(f"zig-zag order needs T={T} (axis {axis}) to be a multiple of 2n, n={n}")
    chunks = x.reshape(*x.shape[:axis], 2 * n, T // (2 * n), *x.shape[axis + 1:])
    return xp.take(chunks, xp.asarray(order), axis=axis).reshape(x.shape)


def check(axes: MeshAxes, config: NSAConfig, B: int, T: int, S: int, H: int, packed: bool):
    """The mesh and shapes ``axes`` needs; returns the mesh. Errors name the axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(f"sharding over mesh axes ({axes}) needs the mesh: call under `with "
                         f"jax.set_mesh(mesh)`")
    for field in ("batch", "heads", "context"):
        for name in _names(getattr(axes, field)):
            if name not in mesh.axis_names:
                raise ValueError(f"mesh_axes.{field}={name!r} is not an axis of the mesh "
                                 f"{dict(zip(mesh.axis_names, mesh.axis_sizes))}")
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    used = {n: kinds[n].name for f in ("batch", "heads", "context")
            for n in _names(getattr(axes, f))}
    if len(set(used.values())) > 1:
        raise ValueError(f"the mesh axes NSA shards over mix axis types {used}: make them all "
                         f"Explicit or all Auto")
    for field, dim, what in (("batch", B, "B"), ("heads", H, "H (KV heads)")):
        n = _size(mesh, getattr(axes, field))
        if dim % n:
            raise ValueError(f"{what}={dim} is not a multiple of the {n} devices of mesh axis "
                             f"{getattr(axes, field)!r} ({field})")
    if axes.context is not None:
        _check_context(axes, config, T, S, _size(mesh, axes.context), packed)
    return mesh


def _check_context(axes: MeshAxes, config: NSAConfig, T: int, S: int, n: int, packed: bool):
    name = axes.context
    if not config.causal:
        raise ValueError(f"context parallel (mesh axis {name!r}) needs config.causal=True")
    if S != T:
        raise ValueError(f"context parallel (mesh axis {name!r}) is self-attention: S={S} must "
                         f"equal T={T}")
    pieces = n * (2 if axes.layout == "zigzag" else 1)
    if T % pieces:
        raise ValueError(f"T={T} is not a multiple of {pieces}, the {axes.layout} pieces of "
                         f"the {n} devices of mesh axis {name!r}")
    if packed and T // pieces < config.select_q_tile:
        raise ValueError(f"each device's run of {T // pieces} packed tokens (T={T} over mesh "
                         f"axis {name!r}, {axes.layout}) must hold at least select_q_tile="
                         f"{config.select_q_tile}: a tile cut by a device edge takes its other "
                         f"queries from the neighbouring runs")
    # Packed rows tile each document from its own start; a tile a device edge cuts gets its
    # other queries from the neighbours (`_packed_context_body`).
    if not packed and (T // pieces) % config.select_q_tile:
        raise ValueError(f"each device's run of {T // pieces} queries (T={T} over mesh axis "
                         f"{name!r}, {axes.layout}) must be a multiple of select_q_tile="
                         f"{config.select_q_tile}, so that selection tiles match one device's")


def run(local, attend, axes: MeshAxes, mesh, q, k, v, g, segment_ids, compress_params, *,
        config: NSAConfig, return_selection: bool, max_segments: int | None, gather_all: bool):
    """`nsa_attention` on sharded inputs, in one `jax.shard_map` over ``mesh``.

    ``local(q, k, v, g, segment_ids, compress_params)``: `nsa_attention` on one device's rows and
    heads (the batch and head axes). ``attend(q, k, v, k_c, v_c, g, kv_len, key_bounds)``:
    `api.attend_with_lengths` with the call's options (the context axis). ``gather_all``: packed
    rows over the context axis gather everything and run ``local`` on whole rows (the reference,
    which is the oracle, not a path to scale)."""
    b, h, c = axes.batch, axes.heads, axes.context
    x_spec, seg_spec = P(b, c, h, None), P(b, c)
    sel_specs = (P(b, h, c, None), P(b, h, c))
    if c is None:
        def body(q, k, v, g, seg, params):
            out = local(q, k, v, g, seg, params)
            return (out[0], (out[1].indices, out[1].counts)) if return_selection else out
    else:
        n = _size(mesh, c)

        def body(q, k, v, g, seg, params):
            where = dict(axis=c, n=n, layout=axes.layout)
            if seg is None:
                return _context_body(attend, q, k, v, g, params, **where, config=config,
                                     return_selection=return_selection)
            if gather_all:
                return _gathered_body(local, q, k, v, g, seg, params, **where)
            return _packed_context_body(attend, q, k, v, g, seg, params, **where,
                                        config=config, max_segments=max_segments)

    specs = (x_spec, x_spec, x_spec, x_spec, seg_spec, param_specs(config, compress_params, h))
    args = (q, k, v, g, segment_ids, compress_params)
    if _explicit(axes, mesh):
        args = tuple(_reshard(a, s) for a, s in zip(args, specs))
    out_specs = (x_spec, sel_specs) if return_selection else x_spec
    # check_vma=False: the Pallas kernels' out_shape carries no varying-axes annotation.
    out = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs,
                        check_vma=False)(*args)
    if not return_selection:
        return out
    o, (indices, counts) = out
    return o, BlockSparseIndices(indices, counts, q_tile=config.select_q_tile,
                                 block_size=config.select_block)


def run_decode(step, axes: MeshAxes, mesh, q, k, v, g, cache, num_new, compress_params, *,
               config: NSAConfig):
    """`nsa_decode` with q, k, v, g and the cache sharded over B and the heads, in one
    `jax.shard_map`: ``step(q, k, v, g, cache, num_new, compress_params)`` on each device's rows
    and heads; nothing is communicated."""
    b, h = axes.batch, axes.heads
    x_spec = P(b, None, h, None)
    cache_spec = jax.tree.map(lambda x: x_spec if x.ndim == 4 else P(b), cache)
    specs = (x_spec, x_spec, x_spec, x_spec, cache_spec, P(b),
             param_specs(config, compress_params, h))
    args = (q, k, v, g, cache, num_new, compress_params)
    if _explicit(axes, mesh):
        args = tuple(_reshard(a, s) for a, s in zip(args, specs))
    return jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=(x_spec, cache_spec),
                         check_vma=False)(*args)


def param_specs(config: NSAConfig, params, heads):
    """The compression parameters' specs: "linear" has one matrix per KV head (split with the
    heads), the others share theirs across heads (replicated)."""
    per_head = config.compress_method == "linear"
    return jax.tree.map(lambda _: P(heads) if per_head else P(), params)


def _explicit(axes: MeshAxes, mesh) -> bool:
    """Whether the axes sharded over are Explicit (then inputs are resharded to the specs)."""
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    names = [n for f in ("batch", "heads", "context") for n in _names(getattr(axes, f))]
    return any(kinds[n] == AxisType.Explicit for n in names)


def _reshard(tree, specs):
    """Each array of ``tree`` resharded to its spec in ``specs`` (same structure, specs leaves)."""
    leaves, treedef = jax.tree.flatten(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    return treedef.unflatten([jax.sharding.reshard(x, sp) for x, sp in zip(leaves, spec_leaves)])


def _context_body(attend, q, k, v, g, params, *, axis, n: int, layout: str, config: NSAConfig,
                  return_selection: bool):
    """One device's queries q [B, T/N, HQ, D] over the keys of every device."""
    i = jax.lax.axis_index(axis)
    k, v = _gather(k, axis, n, layout), _gather(v, axis, n, layout)  # [B, S, H, D]
    k_c, v_c = compress_checked(k, v, config, params)
    B, T_l = q.shape[:2]
    outs, sels = [], []
    for lo, hi, start in _runs(i, n, layout, T_l):
        kv_len = jnp.full((B,), start + hi - lo, jnp.int32)
        o, sel = attend(q[:, lo:hi], k, v, k_c, v_c, None if g is None else g[:, lo:hi], kv_len)
        outs.append(o)
        sels.append(sel)
    o = jnp.concatenate(outs, axis=1)
    if not return_selection:
        return o
    return o, (jnp.concatenate([s.indices for s in sels], axis=2),
               jnp.concatenate([s.counts for s in sels], axis=2))


def _runs(i, n: int, layout: str, T_l: int):
    """(lo, hi, start) of each run of device i's T_l tokens: local rows lo .. hi - 1 are the
    sequence's tokens start .. start + hi - lo - 1."""
    if layout == "contiguous":
        return ((0, T_l, i * T_l),)
    C = T_l // 2
    return ((0, C, i * C), (C, T_l, (2 * n - 1 - i) * C))


def _gather(x, axis, n: int, layout: str):
    """[B, T/N, ...] shards -> [B, T, ...] in the sequence's order."""
    x = jax.lax.all_gather(x, axis, axis=1, tiled=True)
    return _natural(x, n) if layout == "zigzag" else x


def _gathered_body(local, q, k, v, g, seg, params, *, axis, n: int, layout: str):
    """Whole rows on every device, then this device's runs of the result."""
    full = [None if x is None else _gather(x, axis, n, layout) for x in (q, k, v, g, seg)]
    o = local(*full, params)
    i = jax.lax.axis_index(axis)
    return jnp.concatenate([jax.lax.dynamic_slice_in_dim(o, start, hi - lo, axis=1)
                            for lo, hi, start in _runs(i, n, layout, q.shape[1])], axis=1)


def _packed_context_body(attend, q, k, v, g, seg, params, *, axis, n: int, layout: str,
                         config: NSAConfig, max_segments: int | None):
    """One device's queries of packed rows. Every device builds the whole row's aligned layout
    (`segments.pack`) of the gathered keys; each run of its queries moves to a window of that
    layout starting at a multiple of the alignment unit, and attends there with the documents'
    key bounds and per-row lengths (the window's end). A query tile of a document that
    straddles two devices selects for all its queries, so the window also holds the
    ``select_q_tile - 1`` queries on each side of the run (gathered from the neighbours; their
    outputs are dropped)."""
    i = jax.lax.axis_index(axis)
    k, v, seg = (_gather(x, axis, n, layout) for x in (k, v, seg))
    packing = segments.pack(seg, config, max_segments)
    B, T_l = q.shape[:2]
    T_a, A = packing.length, segments.unit(config)
    runs = _runs(i, n, layout, T_l)
    R = runs[0][1] - runs[0][0]
    # Room for the run's documents, each rounded up to A, and the window's start rounded down.
    docs = -(-R // A) + 1 if max_segments is None else max_segments
    L = segments.capacity(R, config, docs)
    # Keys past T_a are padding no document sees, so a window may end past the layout.
    pad = lambda x: jnp.pad(x, [(0, 0), (0, L)] + [(0, 0)] * (x.ndim - 2))
    k_a, v_a = pad(packing.align(k)), pad(packing.align(v))
    k_c, v_c = compress_checked(k_a, v_a, config, params)
    rows = jnp.arange(T_a, T_a + L, dtype=jnp.int32)[None].repeat(B, axis=0)
    lo_a = jnp.concatenate([packing.lo, rows], axis=1)
    hi_a = jnp.concatenate([packing.hi, rows], axis=1)
    E = config.select_q_tile - 1
    edges = _edge_queries(q, runs, E, axis) if E else None
    into = jax.vmap(lambda s, x: jnp.zeros((L, *x.shape[1:]), x.dtype).at[s].set(
        x, mode="drop"))
    outs = []
    for lo, hi, start in runs:
        dest = jax.lax.dynamic_slice_in_dim(packing.dest, start, hi - lo, axis=1)  # [B, R]
        real = dest < T_a
        base = jnp.min(jnp.where(real, dest, T_a), axis=1) // A * A  # [B]
        base = jnp.where(real.any(axis=1), base, 0)
        slot = jnp.where(real, dest - base[:, None], L)  # [B, R]; L: dropped
        jax.debug.callback(functools.partial(_check_window, L=L, docs=docs),
                           jnp.max(jnp.where(real, slot, 0)))
        slots, queries = [slot], [q[:, lo:hi]]
        for tokens, rows_q in (() if not E else _neighbours(edges, start, R, E, n, layout)):
            T = seg.shape[1]
            d = jnp.take(packing.dest, jnp.clip(tokens, 0, T - 1), axis=1)  # [B, E]
            s = d - base[:, None]
            keep = (tokens >= 0)[None] & (tokens < T)[None] & (d < T_a) & (s >= 0) & (s < L)
            slots.append(jnp.where(keep, s, L))
            queries.append(rows_q)
        pos = base[:, None] + jnp.arange(L, dtype=jnp.int32)  # [B, L] aligned key positions
        bounds = segments.KeyBounds(jnp.take_along_axis(lo_a, pos, axis=1),
                                    jnp.take_along_axis(hi_a, pos, axis=1))
        o, _ = attend(into(jnp.concatenate(slots, 1), jnp.concatenate(queries, 1)), k_a, v_a,
                      k_c, v_c, None if g is None else into(slot, g[:, lo:hi]), base + L,
                      key_bounds=bounds)
        outs.append(jax.vmap(lambda r, s: r.at[s].get(mode="fill", fill_value=0))(o, slot))
    return jnp.concatenate(outs, axis=1)


def _edge_queries(q, runs, E: int, axis):
    """[B, N * runs, 2, E, HQ, D]: the first and the last E queries of every run of every
    device (device-major)."""
    B, _, HQ, D = q.shape
    edges = jnp.concatenate([x for lo, hi, _ in runs for x in (q[:, lo:lo + E], q[:, hi - E:hi])],
                            axis=1)
    edges = jax.lax.all_gather(edges, axis, axis=1, tiled=True)
    return edges.reshape(B, -1, 2, E, HQ, D)


def _neighbours(edges, start, R: int, E: int, n: int, layout: str):
    """(tokens [E], queries [B, E, HQ, D]) of the E tokens before and the E after the run of R
    tokens starting at token ``start``: the last E of the previous chunk and the first E of the
    next (positions outside the row are the caller's to drop)."""
    c = start // R
    for chunk, part, tokens in ((c - 1, 1, start - E), (c + 1, 0, start + R)):
        if layout == "contiguous":
            owner = chunk
        else:  # device i holds chunks i (its run 0) and 2n-1-i (its run 1)
            owner = jnp.where(chunk < n, 2 * chunk, 2 * (2 * n - 1 - chunk) + 1)
        rows = jnp.take(edges, jnp.clip(owner, 0, edges.shape[1] - 1), axis=1)[:, part]
        yield tokens + jnp.arange(E, dtype=jnp.int32), rows


def _check_window(top, *, L: int, docs: int) -> None:
    if int(top) >= L:
        raise ValueError(f"segment_ids: a device's run of packed tokens spans {int(top) + 1} "
                         f"aligned rows but its window holds {L} (room for {docs} documents); "
                         f"pass max_segments >= the documents per row")


def _natural(x, n: int):
    """[B, T, ...] all-gathered from zig-zag shards back in natural order."""
    B, T = x.shape[:2]
    pairs = x.reshape(B, n, 2, T // (2 * n), *x.shape[2:])
    return jnp.concatenate([pairs[:, :, 0], pairs[:, ::-1, 1]], axis=1).reshape(x.shape)
