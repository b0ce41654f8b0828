"""`nsa-jax demo` and `nsa-jax bench` end to end on tiny settings (the full demo is the README's
first command; the full benchmark needs a GPU)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import nsa_jax
from nsa_jax.tools import bench, cli


def test_demo_smoke(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "1", "--seq-len", "256", "--batch-size", "2",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "held-out answer accuracy" in out and "chance" in out
    for name in ("loss.png", "selection.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_bench_smoke(tmp_path, capsys):
    """`nsa-jax bench` on a tiny shape: every row measured, nothing failed, JSON and PNG written."""
    assert cli.main(["bench", "--lengths", "130", "--shapes", "4x2x16", "--reps", "1",
                     "--packed-lengths", "300", "--document-range", "60", "150",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "HQ4-H2-D16" in out and "failed" not in out
    record = json.loads((tmp_path / "bench.json").read_text())
    rows = record["shapes"]["HQ4-H2-D16"]["results"]["130"]
    assert set(rows) == set(bench.ROWS)
    packed = record["shapes"]["HQ4-H2-D16"]["results"]["300"]
    assert set(packed) == set(bench.PACKED_ROWS)
    assert sum(record["packed_documents"]["300"]) == 300
    for name, row in {**rows, **packed}.items():
        assert row["error"] is None and row["ms"] > 0, name
    assert rows["dense"]["tflops"] > 0 and rows["window"]["tflops"] > 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_decode_smoke(tmp_path, capsys):
    """`nsa-jax bench --decode`: a step and dense decode timed per point, prefill against the
    forward, decode.json written."""
    assert cli.main(["bench", "--decode", "--lengths", "300", "--batches", "2", "--shapes",
                     "4x2x16", "--reps", "1", "--prefill-lengths", "200",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| HQ4-H2-D16 | 2 | 300 |" in out and "prefill T=200" in out
    record = json.loads((tmp_path / "decode.json").read_text())
    (row,) = record["rows"]
    assert row["nsa_ms"] > 0 and row["dense_ms"] > 0 and row["bound_us"] > 0
    assert record["prefill"][0]["prefill_ms"] > 0 and record["bandwidth_bytes_per_s"] > 0


@pytest.mark.parametrize("argv,message", [
    (["--decode", "--tune"], "drop --tune"),
    (["--prefill-lengths", "64"], "a part of --decode"),
    (["--shapes", "64x5"], "HQ must be a positive multiple of H"),
    (["--shapes", "sixty"], "must read HQxH"),
    (["--lengths", "0"], "must be positive"),
    (["--document-range", "9", "3"], "SHORTEST <= LONGEST"),
    (["--tune", "--implementation", "xla"], "needs --implementation triton"),
])
def test_bench_rejects(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", *argv])
    assert message in capsys.readouterr().err


def test_shape_parse():
    assert bench.Shape.parse("32x8") == bench.Shape(HQ=32, H=8, D=128)
    assert bench.Shape.parse("4x2x64").name == "HQ4-H2-D64"


def test_demo_defaults_in_the_parser_match_the_demo():
    from nsa_jax.tools import demo
    cfg = demo.DemoConfig()
    assert cli.DEMO_DEFAULTS == {name: getattr(cfg, name) for name in cli.DEMO_DEFAULTS}


def test_help_and_version_load_no_jax():
    """`nsa-jax --help` and `--version` answer without importing jax (a fresh interpreter)."""
    import subprocess
    import sys
    code = ("import sys\nfrom nsa_jax.tools import cli\n"
            "for argv in (['--version'], ['--help'], ['demo', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print('JAX LOADED' if 'jax' in sys.modules else 'NO JAX')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "nsa-jax" in out.stdout and out.stdout.strip().endswith("NO JAX")


def test_triton_on_a_cpu_needs_interpret(capsys):
    import jax
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU runs the kernels natively")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--implementation", "triton", "--steps", "1"])
    assert "--interpret" in capsys.readouterr().err


def test_bench_refuses_dense_attention_larger_than_memory(capsys, monkeypatch):
    import jax
    if jax.default_backend() == "gpu":
        pytest.skip("the guard is for XLA's dense attention on a CPU")
    monkeypatch.setattr(cli, "_memory_bytes", lambda: 2**30)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--lengths", "8192", "--shapes", "64x4"])
    err = capsys.readouterr().err
    assert "would need about 32 GiB" in err and "--force" in err


def test_demo_control_leaves_branches_out():
    """With every branch listed the control path computes the layer itself; a control run
    zeroes what it leaves out, and bad branch lists are refused."""
    import jax
    from flax import nnx

    from nsa_jax.tools import demo
    cfg = demo.DemoConfig(seq_len=256, width=32, head_dim=8)
    block = demo.Block(cfg, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(0), (1, 256, 32))
    np.testing.assert_allclose(block._control(h), block.attn(h), atol=1e-5)
    window = demo.Block(dataclasses.replace(cfg, branches=("window",)), rngs=nnx.Rngs(0))
    q, k, v, g = window.attn.project(h)
    o_w = nsa_jax.sliding_window_attention(q, k, v, config=cfg.nsa)
    want = window.attn.out(o_w * g[..., 2:3])
    np.testing.assert_allclose(window._control(h), want, atol=1e-5)
    with pytest.raises(ValueError, match="branches=\\('gates',\\) must be a non-empty subset"):
        demo.DemoConfig(branches=("gates",))
    with pytest.raises(SystemExit):
        cli.main(["demo", "--branches", "dense"])


def test_demo_devices_reach_the_config(capsys):
    """3 devices put 256 tokens in runs of 85.3: refused before anything trains, naming why."""
    with pytest.raises(SystemExit):
        cli.main(["demo", "--devices", "3", "--seq-len", "256"])
    assert "devices=3" in capsys.readouterr().err
