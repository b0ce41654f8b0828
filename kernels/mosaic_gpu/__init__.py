"""Pallas Mosaic GPU kernels (Hopper, sm90)."""
