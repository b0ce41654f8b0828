"""The training example runs end to end (a few steps, tiny sizes)."""

from __future__ import annotations

import math
import pathlib
import runpy

import pytest


def test_train_lm_runs():
    path = pathlib.Path(__file__).parents[1] / "examples" / "train_lm.py"
    main = runpy.run_path(str(path))["main"]
    result = main(["--seq-len", "256", "--steps", "3", "--width", "32", "--layers", "1",
                   "--batch", "2"])
    assert math.isfinite(result["loss"])
    assert result["step_ms"] > 0


def test_train_lm_data_and_context_parallel_matches_one_device():
    """Four host devices (conftest): 2-way data x 2-way context parallel; the loss after three
    steps equals the single-device run's."""
    import jax
    if len(jax.devices()) < 4:
        pytest.skip("needs four devices")
    path = pathlib.Path(__file__).parents[1] / "examples" / "train_lm.py"
    main = runpy.run_path(str(path))["main"]
    argv = ["--seq-len", "256", "--steps", "3", "--width", "32", "--layers", "1", "--batch", "2"]
    one = main(argv)["loss"]
    four = main(argv + ["--devices", "4"])["loss"]
    assert abs(four - one) <= 1e-4 * abs(one), (four, one)


def test_stdlib_lm_runs_every_model(tmp_path):
    path = pathlib.Path(__file__).parents[1] / "examples" / "stdlib_lm.py"
    main = runpy.run_path(str(path))["main"]
    out = tmp_path / "stdlib_lm.json"
    record = main(["--context", "256", "--steps", "2", "--width", "32", "--depth", "1",
                   "--batch", "2", "--eval-every", "2", "--eval-batches", "1", "--window", "64",
                   "--probe-span", "32", "--max-bytes", "300000", "--out", str(out)])
    assert out.exists() and set(record["results"]) == {"dense", "nsa", "window"}
    params = {r["parameters"] for r in record["results"].values()}
    assert len(params) == 1  # the three differ only in what the queries attend to
    for r in record["results"].values():
        assert all(math.isfinite(v) for _, v in r["validation_bits_per_byte"])
        assert math.isfinite(r["probe_first_bits_per_byte"])
        assert math.isfinite(r["probe_repeat_bits_per_byte"])
