"""`rapid3 demo` on a tiny random-weight SD3-architecture DiT: every hand-set controller runs."""

from __future__ import annotations

from rapid3.cli import main


def test_demo_runs_every_controller(capsys) -> None:
    assert main(["demo", "--tokens", "16", "--layers", "1", "--steps", "4"]) == 0
    table = capsys.readouterr().out
    assert all(row in table for row in ("full compute", "uniform", "FORA", "static sparse"))
