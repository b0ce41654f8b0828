"""Tools built on the library: `nsa-jax demo`, `nsa-jax bench` and the command line. Nothing in
the library imports them."""
