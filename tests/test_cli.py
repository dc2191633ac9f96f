"""The command line's own output: one-line errors and text that holds square brackets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retroact.cli import app, main
from retroact.models import pretrained


def test_an_error_prints_one_line_with_its_brackets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    find_spec = importlib.util.find_spec
    no_gguf = lambda name, *a: None if name == "gguf" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", no_gguf)
    monkeypatch.setattr(pretrained, "init_pretrained", lambda *a: pretrained.load_gguf(tmp_path / "m.gguf"))
    argv = ["retroact", "init-model", str(tmp_path / "m"), "--from", "smollm2-135m"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    lines = capsys.readouterr().out.strip().splitlines()
    # rich took "[smollm2]" for a style tag and printed "pip install 'retroact'", a wrong command.
    assert lines == [
        "error: reading GGUF files needs the `gguf` package: pip install 'retroact[smollm2]' (gguf==0.19.0)"
    ]


def test_data_names_the_extra_it_needs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETROACT_DATA", str(tmp_path))
    res = CliRunner().invoke(app, ["data"])
    assert res.exit_code == 0, res.output
    assert "`retroact[alfworld]`" in res.output and "MISSING" in res.output
