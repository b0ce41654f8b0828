"""The ``nsa-jax`` command line."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsa-jax", description="Native Sparse Attention for JAX.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="train a small NSA transformer on long-range key-value retrieval",
        description="Train a small NSA transformer on a synthetic key-value retrieval task whose "
                    "pairs lie beyond the sliding window, report held-out answer accuracy, and "
                    "plot the loss curve and the blocks the last layer selects.")
    demo.add_argument("--steps", type=int, default=None, help="optimiser steps")
    demo.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (T)")
    demo.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--out", default="nsa_demo_out", help="directory for loss.png and selection.png")
    demo.add_argument("--implementation", default=None,
                      choices=("xla", "reference", "triton", "mosaic"),
                      help="NSA implementation (default: the fastest available)")
    return parser


def _demo(args: argparse.Namespace) -> int:
    # Imported here so that `nsa-jax --help` answers without loading JAX.
    from nsa_jax import demo

    overrides = {name: value for name, value in (("steps", args.steps), ("seq_len", args.seq_len),
                                                  ("batch_size", args.batch_size))
                 if value is not None}
    result = demo.run(seed=args.seed, out=args.out, implementation=args.implementation, **overrides)
    print(f"held-out answer accuracy {result['accuracy']:.1%} (chance {result['chance']:.1%}) "
          f"in {result['seconds']:.0f} s; plots: {result['loss_png']}, {result['selection_png']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``nsa-jax`` with ``argv`` (default: the process arguments); returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
