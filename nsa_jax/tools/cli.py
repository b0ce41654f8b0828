"""The ``nsa-jax`` command line.

jax, flax and matplotlib load only once a command runs, so ``--help`` and ``--version`` answer at
once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import sys

# `nsa_jax.tools.demo.DemoConfig`'s defaults, repeated so that building the parser imports
# nothing heavy (tests/test_cli.py checks that they agree).
DEMO_DEFAULTS = dict(steps=300, seq_len=2048, batch_size=8, seed=0,
                     branches=("compressed", "selected", "window"), devices=1)
# The implementations the commands can run; "reference" is too slow to train or time with.
RUNNABLE = ("xla", "triton", "mosaic")
GPU_LENGTHS = [8192, 16384, 32768, 65536, 131072]
CPU_LENGTHS = [2048]


def _version() -> str:
    try:
        return importlib.metadata.version("nsa-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsa-jax", description="Native Sparse Attention for JAX.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    defaults = argparse.Namespace(**DEMO_DEFAULTS)
    sub = commands.add_parser(
        "demo", help="train a small NSA transformer on long-range key-value retrieval",
        description="Train a small NSA transformer to retrieve values stored farther back than "
                    "its sliding window, report held-out accuracy against chance, and plot the "
                    "training curves and the blocks the last layer selects.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    sub.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per sequence")
    sub.add_argument("--batch-size", type=int, default=defaults.batch_size,
                     help="sequences per step")
    sub.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    sub.add_argument("--branches", nargs="+", default=list(defaults.branches),
                     choices=defaults.branches,
                     help="NSA branches the model uses; leave some out for a control run (e.g. "
                          "--branches window: the window alone cannot reach the needles)")
    sub.add_argument("--devices", type=int, default=defaults.devices,
                     help="train data and context parallel on this many devices (on a CPU, "
                          "that many host devices are made)")
    sub.add_argument("--out", default="nsa_demo_out", help="directory for loss.png and selection.png")
    sub.add_argument("--implementation", default=None, choices=RUNNABLE,
                     help="NSA implementation; None picks the fastest available")
    sub.add_argument("--interpret", action="store_true",
                     help="run the Pallas kernels in interpret mode (--implementation triton or "
                          "mosaic on a CPU; slow)")
    sub.set_defaults(error=sub.error, run=_demo)

    sub = commands.add_parser(
        "bench", help="time NSA (whole layer and per branch) against dense attention",
        description="Time the NSA forward and backward, whole layer and each branch, against dense causal "
                    "attention (cuDNN on a GPU) in the same process; print tables and write "
                    "bench.json and bench.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_argument("--lengths", type=int, nargs="*", default=None,
                     help=f"sequence lengths T (default: {GPU_LENGTHS} on a GPU, {CPU_LENGTHS} "
                          "on a CPU)")
    sub.add_argument("--shapes", nargs="+", default=["64x4", "32x8"],
                     help="HQxH or HQxHxD (B=1, D=128 unless given)")
    sub.add_argument("--reps", type=int, default=5, help="timed runs per row (median reported)")
    sub.add_argument("--forward-only", action="store_true", help="skip the backward rows")
    sub.add_argument("--train-lengths", type=int, nargs="*", default=[],
                     help="also time a jitted NNX training step of one layer at these T")
    sub.add_argument("--packed-lengths", type=int, nargs="*", default=[],
                     help="also time rows of T tokens packed with documents (segment_ids) against "
                          "dense attention inside each document")
    sub.add_argument("--document-range", type=int, nargs=2, default=[1024, 16384],
                     metavar=("SHORTEST", "LONGEST"), help="document lengths of --packed-lengths")
    sub.add_argument("--decode", action="store_true",
                     help="time one generation step (nsa_decode) at contexts --lengths against "
                          "dense attention over the same cache, instead of the training rows")
    sub.add_argument("--batches", type=int, nargs="+", default=[1, 32],
                     help="batch sizes of --decode")
    sub.add_argument("--prefill-lengths", type=int, nargs="*", default=[],
                     help="with --decode, also time a prefill of this many tokens against the "
                          "training forward")
    sub.add_argument("--tune", action="store_true",
                     help="sweep tilings per kernel first (needs implementation triton)")
    sub.add_argument("--tune-length", type=int, default=32768, help="T of the tiling sweep")
    sub.add_argument("--implementation", default=None, choices=RUNNABLE,
                     help="NSA implementation; default mosaic on Hopper, triton on other GPUs, "
                          "xla otherwise")
    sub.add_argument("--out", default="nsa_bench_out",
                     help="directory for bench.json and bench.png (decode.json with --decode)")
    sub.add_argument("--force", action="store_true",
                     help="run even when dense attention on a CPU would need more memory than the "
                          "machine has")
    sub.set_defaults(error=sub.error, run=_bench)
    return parser


def _demo(args: argparse.Namespace) -> int:
    if args.devices > 1:
        # Read once, when jax starts: it must be set before the import below.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform"
                                   f"_device_count={args.devices}").strip()
    from nsa_jax.tools import demo

    try:
        cfg = dataclasses.replace(demo.DemoConfig(), steps=args.steps, seq_len=args.seq_len,
                                  batch_size=args.batch_size, seed=args.seed,
                                  implementation=args.implementation, interpret=args.interpret,
                                  devices=args.devices,
                                  branches=tuple(b for b in DEMO_DEFAULTS["branches"]
                                                 if b in args.branches))
    except ValueError as err:
        args.error(str(err))
    _check_backend(args)
    result = demo.run(cfg, out=args.out)
    print(f"held-out answer accuracy {result.accuracy:.1%} (chance {result.chance:.1%}); needle "
          f"blocks selected by the query tiles: {result.needle_recall:.1%}; wall time "
          f"{result.seconds:.0f} s; plots: {result.loss_png}, {result.selection_png}")
    return 0


def _check_backend(args: argparse.Namespace) -> None:
    """Refuses a Pallas implementation this machine cannot run natively, unless interpret mode
    is asked for."""
    from nsa_jax import ops

    interpret = getattr(args, "interpret", False)
    if args.implementation in (None, "xla") or interpret:
        return
    if not (ok := ops.get(args.implementation).available(False)):
        hint = (", or run the kernels in interpret mode with --interpret (slow)"
                if hasattr(args, "interpret") else "")
        args.error(f"--implementation {args.implementation} {ok.reason.split(';')[0]}; use "
                   f"--implementation xla{hint}")


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _bench(args: argparse.Namespace) -> int:
    import jax

    from nsa_jax.tools import bench

    on_gpu = jax.default_backend() == "gpu"
    if args.lengths is None:
        args.lengths = GPU_LENGTHS if on_gpu else CPU_LENGTHS
    if not 1 <= args.document_range[0] <= args.document_range[1]:
        args.error(f"--document-range needs 1 <= SHORTEST <= LONGEST, got {args.document_range}")
    if min(args.lengths + args.packed_lengths, default=1) < 1 or args.reps < 1 or args.tune_length < 1:
        args.error(f"--lengths, --reps and --tune-length must be positive, got {args.lengths}, "
                   f"{args.reps}, {args.tune_length}")
    try:
        shapes = [bench.Shape.parse(s) for s in args.shapes]
    except ValueError as err:
        args.error(str(err))
    if args.tune and args.implementation == "xla":
        args.error("--tune sweeps the triton kernels' tilings; it needs --implementation triton")
    _check_backend(args)
    if args.prefill_lengths and not args.decode:
        args.error("--prefill-lengths is a part of --decode")
    if args.decode:
        from nsa_jax.config import NSAConfig
        from nsa_jax.tools import decode_bench
        mixed = [flag for flag, used in (("--tune", args.tune), ("--forward-only", args.forward_only),
                                         ("--train-lengths", args.train_lengths),
                                         ("--packed-lengths", args.packed_lengths)) if used]
        if mixed:
            args.error(f"--decode times generation steps only; drop {', '.join(mixed)}")
        if min(args.batches + args.prefill_lengths, default=1) < 1:
            args.error(f"--batches and --prefill-lengths must be positive, got {args.batches}, "
                       f"{args.prefill_lengths}")
        decode_bench.run(contexts=args.lengths, batches=args.batches, shapes=shapes,
                         config=NSAConfig(), implementation=args.implementation, reps=args.reps,
                         out=args.out, prefill_lengths=args.prefill_lengths)
        return 0
    if not on_gpu and not args.force:
        # XLA's dense attention on a CPU holds the float32 scores and probabilities, [HQ, T, T].
        need = max((2 * 4 * s.HQ * T * T for s in shapes
                    for T in args.lengths + args.packed_lengths + args.train_lengths), default=0)
        have = _memory_bytes()
        if have is not None and need > have:
            args.error(f"dense attention on this CPU would need about {need / 2**30:.0f} GiB at "
                       f"the longest T and largest HQ; the machine has {have / 2**30:.0f} GiB. "
                       "Pass shorter --lengths or fewer heads in --shapes (or --force)")
    bench.run(lengths=args.lengths, shapes=shapes, reps=args.reps,
              implementation=args.implementation,
              tune_length=args.tune_length if args.tune else None, out=args.out,
              rows=bench.FORWARD_ROWS if args.forward_only else bench.ROWS,
              train_lengths=args.train_lengths, packed_lengths=args.packed_lengths,
              document_range=tuple(args.document_range))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``nsa-jax`` on ``argv`` (default: the process arguments) and returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
