"""`nsa-jax demo` end to end on a tiny setting (the full demo is the README's first command)."""

from __future__ import annotations

from nsa_jax import cli


def test_demo_smoke(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "2", "--seq-len", "256", "--batch-size", "2",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "held-out answer accuracy" in out and "chance" in out
    for name in ("loss.png", "selection.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().err
