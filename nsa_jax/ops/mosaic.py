"""The "mosaic" backend: the three branches' forward, the compressed and window backward, the
selected branch's dQ and tiled block scoring on Pallas Mosaic GPU kernels (Hopper).

A branch's forward runs `kernels/mosaic_gpu/flash_fwd.py` when its tiling is set and the call is
one it serves (`mosaic_serves`):
- bfloat16/float16, unpacked rows;
- at most 64 query heads per KV head, head widths up to 128;
- at least one CTA of rows (T * G_p >= 128; decode steps run Triton);
- for the selected branch, selection rows of whole CTAs and blocks of a multiple of 64 keys.

Every branch's forward, the selected one included, is on by default (`MosaicTilings`); a
tiling set to None runs that branch on Triton.

Block scoring runs `kernels/mosaic_gpu/block_scores.py` (`scoring_config`) when the forward's
first three conditions hold, selection is per tile (``select_q_tile > 1``), a CTA gets 64 to 256
rows (`block_scores.serves`) and `MosaicTilings.scoring` is set (``scoring_small_groups`` tiles
groups of up to 4 heads).

The compressed and window branches' backward runs the Mosaic GPU dQ and dK/dV kernels of
`kernels/mosaic_gpu/flash_bwd.py` where the forward's conditions hold and
`MosaicTilings.*_dq` / `*_dkv` are set (the default); the selected branch's dQ runs there by
default (`selected_dq`), its dK/dV when `selected_dkv` is set (opt-in: slower than Triton's on
the H200). Other calls and the
rest of the backward run the Triton-lowered kernels of the "triton" backend. Every forward feeds
the same `custom_vjp` (`ops.triton.flash`), whose backward needs only the inputs, o and lse, so
results agree with "triton" up to float rounding whichever kernel ran.
"""

from __future__ import annotations

import dataclasses

import jax

from nsa_jax import metadata
from nsa_jax.config import NSAConfig
from nsa_jax.kernels.common import compute_major, pow2
from nsa_jax.kernels.mosaic_gpu import block_scores as mosaic_scores
from nsa_jax.kernels.mosaic_gpu.flash_fwd import COMPUTE_WGS, ROWS
from nsa_jax.kernels.mosaic_gpu.tiling import MosaicTilings
from nsa_jax.kernels.triton.tiling import TritonTilings
from nsa_jax.ops import base
from nsa_jax.ops import triton as tri


def mosaic_serves(q, k, v, *, packed: bool, q_tile: int | None = None,
                  select_block: int | None = None) -> bool:
    """Whether the Mosaic GPU forward kernel serves a branch call (see the module docstring)."""
    G = q.shape[2] // k.shape[2]
    if q.dtype.name not in ("bfloat16", "float16") or packed or pow2(G) > ROWS:
        return False
    if max(q.shape[3], v.shape[3]) > 128:
        return False
    if q.shape[1] * pow2(G) < COMPUTE_WGS * ROWS:
        # Fewer rows than one CTA (decode steps): mostly padding; the Triton kernels fit.
        return False
    if q_tile is not None:
        return q_tile % (COMPUTE_WGS * ROWS // pow2(G)) == 0 and select_block % 64 == 0
    return True


def _backward_configs(serves: bool, dq, dkv):
    """(dQ, dK/dV) Mosaic GPU configs of a branch's backward, or None: all on Triton."""
    return (dq, dkv) if serves and (dq is not None or dkv is not None) else None


def compressed_attention(q, k_c, v_c, cfg: NSAConfig, S: int, kv_len, bounds, interpret,
                         t: MosaicTilings):
    serves = mosaic_serves(q, k_c, v_c, packed=bounds is not None)
    return tri.compressed_attention(q, k_c, v_c, cfg, S, kv_len, bounds, interpret, t.triton,
                                    fwd=t.compressed if serves else None,
                                    mosaic_bwd=_backward_configs(serves, t.compressed_dq,
                                                                 t.compressed_dkv))


def selected_attention(q, k, v, sel: metadata.BlockSparseIndices, cfg: NSAConfig, bounds,
                       interpret, t: MosaicTilings, kv_len=None):
    serves = mosaic_serves(q, k, v, packed=bounds is not None, q_tile=sel.q_tile,
                           select_block=sel.block_size)
    # A tile may not straddle two blocks.
    fits = lambda c: c if sel.block_size % c.block_k == 0 else dataclasses.replace(c, block_k=64)
    fwd = fits(t.selected) if serves and t.selected is not None else None
    dq = fits(t.selected_dq) if serves and t.selected_dq is not None else None
    dkv = t.selected_dkv if serves else None
    return tri.selected_attention(q, k, v, sel, cfg, bounds, interpret, t.triton, fwd=fwd,
                                  kv_len=kv_len,
                                  mosaic_bwd=None if dq is None and dkv is None else (dq, dkv))


def sliding_window_attention(q, k, v, cfg: NSAConfig, bounds, interpret, t: MosaicTilings,
                             kv_len=None):
    serves = mosaic_serves(q, k, v, packed=bounds is not None)
    return tri.sliding_window_attention(q, k, v, cfg, bounds, interpret, t.triton,
                                        fwd=t.window if serves else None, kv_len=kv_len,
                                        mosaic_bwd=_backward_configs(serves, t.window_dq,
                                                                     t.window_dkv))


def scoring_config(q, k_c, cfg: NSAConfig, bounds, t: MosaicTilings):
    """``t.scoring_for(G)`` when the Mosaic GPU compressed-mass kernel serves the scoring call,
    else None (the Triton kernels score)."""
    qt, G = cfg.select_q_tile, q.shape[2] // k_c.shape[2]
    scoring = t.scoring_for(G)
    if scoring is None or qt == 1 or not mosaic_serves(q, k_c, k_c, packed=bounds is not None):
        return None
    return scoring if mosaic_scores.serves(G, qt, scoring) else None


def _hopper() -> bool:
    return jax.default_backend() == "gpu" and compute_major(jax.devices()[0]) == "9"


class MosaicBackend(base.Backend):
    """Pallas Mosaic GPU kernels where they serve, Triton-lowered ones elsewhere: Hopper GPUs
    (sm90), or the interpreters on any machine."""

    name = "mosaic"
    tilings_type = MosaicTilings

    def available(self, interpret: bool) -> base.Support:
        if interpret or _hopper():
            return base.YES
        device = jax.devices()[0]
        kind = getattr(device, "device_kind", jax.default_backend())
        return base.Support(
            f"needs a Hopper GPU (compute capability 9.x, this machine has {kind!r}); use "
            "implementation='triton' on other GPUs, or pass interpret=True to run the kernels "
            "under the Mosaic GPU interpreter")

    def supports(self, op: str, config, shapes: base.Shapes) -> base.Support:
        return tri.BACKEND.supports(op, config, shapes)

    def tilings_from(self, tilings):
        # `TritonTilings` (e.g. from `nsa-jax bench --tune`) tile the Triton kernels this
        # backend runs.
        if isinstance(tilings, TritonTilings):
            return MosaicTilings(triton=tilings)
        return super().tilings_from(tilings)

    def compressed_attention(self, q, k_c, v_c, config, *, S, kv_len, compressed_bounds,
                             interpret, tilings):
        return compressed_attention(q, k_c, v_c, config, S, kv_len, compressed_bounds,
                                    interpret, tilings)

    def select_blocks(self, q, k_c, config, *, S, kv_len, lse, key_bounds, interpret, tilings):
        return tri.select_blocks(q, k_c, config, S, kv_len, lse, key_bounds, interpret,
                                 tilings.triton, scoring=scoring_config(q, k_c, config, key_bounds,
                                                                        tilings))

    def compressed_and_selection(self, q, k_c, v_c, config, *, S, kv_len, interpret, tilings):
        if mosaic_serves(q, k_c, v_c, packed=False):
            return None
        return tri.compressed_and_selection(q, k_c, v_c, config, S, kv_len, interpret,
                                            tilings.triton)

    def selected_attention(self, q, k, v, sel, config, *, kv_len, key_bounds, interpret, tilings):
        return selected_attention(q, k, v, sel, config, key_bounds, interpret, tilings, kv_len)

    def sliding_window_attention(self, q, k, v, config, *, kv_len, key_bounds, interpret,
                                 tilings):
        return sliding_window_attention(q, k, v, config, key_bounds, interpret, tilings, kv_len)


BACKEND = MosaicBackend()
