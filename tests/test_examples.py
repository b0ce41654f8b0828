"""The training example runs end to end (a few steps, tiny sizes)."""

from __future__ import annotations

import math
import pathlib
import runpy


def test_train_lm_runs():
    path = pathlib.Path(__file__).parents[1] / "examples" / "train_lm.py"
    main = runpy.run_path(str(path))["main"]
    result = main(["--seq-len", "256", "--steps", "3", "--width", "32", "--layers", "1",
                   "--batch", "2"])
    assert math.isfinite(result["loss"])
    assert result["step_ms"] > 0
