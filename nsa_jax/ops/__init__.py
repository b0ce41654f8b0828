"""Backends of the public functions and the selection rules they share."""
