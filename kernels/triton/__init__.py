"""Pallas kernels lowered through Triton: portable across NVIDIA GPUs and runnable in interpret
mode on a CPU."""
