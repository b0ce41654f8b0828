"""Pallas kernels lowered through Triton: portable across NVIDIA GPUs and runnable in interpret
mode on a CPU. `flash_fwd`, `flash_bwd` and `block_scores` hold the kernels and their wrappers,
`tiling` their tilings; the layout and mask rule come from `nsa_jax.kernels.common`."""
