"""What every backend offers: the operations, a tiling type, and whether it can serve a call.

A backend is one object with the same surface. The public functions (`nsa_jax.api`) validate
their inputs, ask the registry (`nsa_jax.ops`) for a backend per operation, and call these
methods with arrays that are already checked; backends never call the public functions.

Operations, by name (the keys of `supports`):
  ``"compressed"``  compressed_attention(q, k_c, v_c, config, *, S, kv_len, compressed_bounds)
                    -> (o [B, T, HQ, Dv], lse [B, T, HQ])
  ``"scoring"``     select_blocks(q, k_c, config, *, S, kv_len, lse, key_bounds)
                    -> BlockSparseIndices
  ``"selected"``    selected_attention(q, k, v, sel, config, *, kv_len, key_bounds) -> o
  ``"window"``      sliding_window_attention(q, k, v, config, *, kv_len, key_bounds) -> o
A backend may also fuse the first two (`Backend.compressed_and_selection`). Every method also takes ``interpret`` and ``tilings`` (an instance of the backend's
``tilings_type``, never None). ``S`` is the static key length, ``kv_len`` None or int32[B] per-row
lengths (keys past a row's length are never visible; its queries end there); ``key_bounds`` / ``compressed_bounds`` are the packed documents' bounds
(`nsa_jax.segments`), None for unpacked rows. Inputs are non-empty (B, T >= 1).
"""

from __future__ import annotations

import abc
import dataclasses

OPERATIONS = ("compressed", "scoring", "selected", "window")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The static facts of a call that decide whether a backend can serve it.

    Attributes:
      B, T, S, HQ, H, D, Dv: the dimension letters of docs/design.md §1.
      per_row_kv_len: ``kv_len`` is an int32[B] array (caches filled to different lengths).
      select_block: keys per block of the selection the selected branch reads (the config's
        ``select_block`` unless explicit indices say otherwise).
    """

    B: int
    T: int
    S: int
    HQ: int
    H: int
    D: int
    Dv: int
    per_row_kv_len: bool = False
    select_block: int = 64


@dataclasses.dataclass(frozen=True)
class Support:
    """A backend's answer: true, or false with the reason (quoted in errors)."""

    reason: str | None = None

    def __bool__(self) -> bool:
        return self.reason is None


YES = Support()


class Backend(abc.ABC):
    """Base of the backends; subclasses set the class attributes and override the operations."""

    name: str
    tilings_type: type

    def available(self, interpret: bool) -> Support:
        """Whether it can run on this machine (``interpret``: Pallas kernels in interpret mode;
        `implementation=None` asks with False, so interpret mode is never picked for a user)."""
        return YES

    def supports(self, op: str, config, shapes: Shapes) -> Support:
        return YES

    def default_tilings(self, device=None):
        return self.tilings_type()

    def tilings_from(self, tilings):
        """The tilings a call runs with, given the user's ``tilings=`` (None, or any backend's):
        its own type as given, anything else this backend's default."""
        return tilings if isinstance(tilings, self.tilings_type) else self.default_tilings()

    @abc.abstractmethod
    def compressed_attention(self, q, k_c, v_c, config, *, S, kv_len, compressed_bounds,
                             interpret, tilings):
        ...

    def compressed_and_selection(self, q, k_c, v_c, config, *, S, kv_len, interpret, tilings):
        """(o, lse, selection) of "compressed" and "scoring" in one pass over k_c for unpacked
        rows, or None where the backend has no such pass for the call (then each runs apart)."""
        return None

    @abc.abstractmethod
    def select_blocks(self, q, k_c, config, *, S, kv_len, lse, key_bounds, interpret, tilings):
        ...

    @abc.abstractmethod
    def selected_attention(self, q, k, v, sel, config, *, kv_len, key_bounds, interpret, tilings):
        ...

    @abc.abstractmethod
    def sliding_window_attention(self, q, k, v, config, *, kv_len, key_bounds, interpret,
                                 tilings):
        ...
