"""Parts a newcomer can hold in their head (STYLE.md, conventions 13): no function in src over 60 lines, no class
over 300. The sizes are read from the source (an AST walk), so the test fails on the commit that grows one."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "peftkit"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 300

# Known offenders ("file:name"), none today. An entry that is no longer too long fails the test below, so the list
# only ever shrinks.
ALLOWED: set[str] = set()


def _sizes(root: Path = SRC) -> dict[str, tuple[str, int]]:
    """``"file:name"`` -> (kind, lines from the ``def``/``class`` line to the last line of the body)."""
    sizes: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                lines = node.end_lineno - node.lineno + 1
                key = f"{rel}:{node.name}"
                if lines > sizes.get(key, (kind, 0))[1]:
                    sizes[key] = (kind, lines)
    return sizes


def _too_long(sizes: dict[str, tuple[str, int]]) -> dict[str, str]:
    limit = {"function": MAX_FUNCTION_LINES, "class": MAX_CLASS_LINES}
    return {key: f"{key}: {kind} of {lines} lines (max {limit[kind]})"
            for key, (kind, lines) in sizes.items() if lines > limit[kind]}


def test_no_function_over_60_lines_no_class_over_300():
    too_long = _too_long(_sizes())
    new = sorted(v for k, v in too_long.items() if k not in ALLOWED)
    assert not new, "split by responsibility (STYLE.md 13):\n" + "\n".join(new)


def test_the_allow_list_names_only_current_offenders():
    sizes = _sizes()
    too_long = _too_long(sizes)
    stale = sorted(k for k in ALLOWED if k not in too_long)
    assert not stale, f"fixed or gone, remove from ALLOWED: {stale}"


def test_the_walk_sees_what_it_measures(tmp_path):
    """The measure itself: a 61-line function and a 301-line class (methods included) are caught, 60 and 300
    are not."""
    def body(n: int, indent: str = "    ") -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    (tmp_path / "m.py").write_text(
        "def ok():\n" + body(59) + "def long():\n" + body(60)
        + "class Fine:\n" + body(299) + "class Big:\n    def method(self):\n" + body(299, " " * 8))
    assert _too_long(_sizes(tmp_path)) == {
        "m.py:long": "m.py:long: function of 61 lines (max 60)",
        "m.py:Big": "m.py:Big: class of 301 lines (max 300)",
        "m.py:method": "m.py:method: function of 300 lines (max 60)",
    }
