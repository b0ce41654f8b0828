"""Backends of the public functions, the registry that picks one, and the selection rules they
share (`nsa_jax.ops.selection`).

A backend (`nsa_jax.ops.base.Backend`) is imported the first time a call needs it, so that
``import nsa_jax`` does not load Pallas. Adding one means its own module and one line in
`_BACKENDS`.
"""

from __future__ import annotations

import importlib

from nsa_jax.ops.base import OPERATIONS, Backend, Shapes, Support

# Fastest first: `implementation=None` takes, per operation, the first that can serve it.
_BACKENDS = {
    "mosaic": "nsa_jax.ops.mosaic",
    "triton": "nsa_jax.ops.triton",
    "xla": "nsa_jax.ops.xla",
}
NAMES = ("reference", *_BACKENDS)


def get(name: str) -> Backend:
    """The backend called ``name`` (`NAMES` less "reference")."""
    return importlib.import_module(_BACKENDS[name]).BACKEND


def tilings_types() -> tuple[type, ...]:
    return tuple(get(name).tilings_type for name in _BACKENDS)


def resolve(implementation: str | None, ops, config, shapes: Shapes, interpret: bool
            ) -> dict[str, Backend]:
    """The backend of each operation in ``ops``.

    None: per operation, the first backend of `_BACKENDS` that runs natively here and supports
    it (the "xla" backend supports everything). A name: that backend for every operation, or an
    error saying why it cannot serve.
    """
    if implementation is None:
        native = [b for b in map(get, _BACKENDS) if b.available(False)]
        return {op: next(b for b in native if b.supports(op, config, shapes)) for op in ops}
    backend = get(implementation)
    if not (ok := backend.available(interpret)):
        raise RuntimeError(f"implementation={implementation!r} {ok.reason}")
    for op in ops:
        if not (ok := backend.supports(op, config, shapes)):
            raise NotImplementedError(f"implementation={implementation!r} {ok.reason}")
    return dict.fromkeys(ops, backend)


__all__ = ["NAMES", "OPERATIONS", "Backend", "Shapes", "Support", "get", "resolve",
           "tilings_types"]
