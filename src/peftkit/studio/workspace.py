"""The studio's workspace: the one folder it reads and writes under.

Every path a client sends is relative to the workspace (or absolute inside it); its symlinks are resolved before it
is checked, so a link pointing out of the workspace is refused like a path that leads out of it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from peftkit.errors import PeftkitError

__all__ = ["StudioError", "Workspace"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class StudioError(PeftkitError):
    """A request the studio refuses; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Workspace:
    """The folder the studio works in (created if missing), symlinks resolved."""

    def __init__(self, root: str | os.PathLike) -> None:
        path = Path(root).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        self.root = path.resolve()
        if not self.root.is_dir():
            raise PeftkitError(f"--workspace {root}: not a folder")

    def path(self, given: str | os.PathLike, what: str = "path") -> Path:
        """`given` (relative to the workspace, or absolute) resolved; an error unless it lies under the workspace.

        Raises:
            StudioError: 403, naming the path as given and the workspace.
        """
        text = str(given)
        if not text or "\x00" in text:
            raise StudioError(f"{what}: empty or invalid path", 400)
        try:
            resolved = (self.root / Path(text).expanduser()).resolve()
        except (OSError, RuntimeError):  # a loop of links
            resolved = None
        if resolved is None or not resolved.is_relative_to(self.root):
            raise StudioError(f"{what} {text!r} is outside the workspace {self.root}: give a path under it", 403)
        return resolved

    def existing(self, given: str | os.PathLike, what: str = "path") -> Path:
        """`path`, which must exist."""
        path = self.path(given, what)
        if not path.exists():
            raise StudioError(f"{what} {str(given)!r} does not exist in the workspace {self.root}", 404)
        return path

    def relative(self, path: Path) -> str:
        """`path` as the client names it: relative to the workspace, with forward slashes."""
        return path.relative_to(self.root).as_posix() or "."

    @staticmethod
    def check_name(name: str, what: str = "name") -> str:
        """A plain file or folder name (letters, digits, ``.``, ``_``, ``-``; no separators)."""
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise StudioError(f"{what} {name!r}: use letters, digits, '.', '_' and '-' (at most 64, no '/')")
        return name

    def is_path_like(self, text: str) -> bool:
        """Whether a model reference names a file or folder (rather than a hub id or a bundled name)."""
        return text.startswith((".", "/", "~")) or text.endswith(".gguf") or (self.root / text).exists()
