"""Where peftkit keeps files between runs: the cache folder and the folders its compiled kernels live in; a file's
content hash.

A leaf module (nothing from peftkit above `errors`), so loaders, the hardware probe and the native-kernel builder
all ask it without importing each other. The cache is ``$PEFTKIT_CACHE`` (default ``~/.cache/peftkit``); compiled
kernels go to ``<cache>/kernels``, or where that cannot be used, to ``$TMPDIR/peftkit-kernels-<uid>``.

A kernel folder holds code this process will `dlopen`, so it must be private: `private_folder` creates it with
mode 0700 and refuses one that is a symbolic link, owned by another user, or writable by group or others (anyone
who can write there could plant a library under the name peftkit loads).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["UnsafeFolder", "cache_dir", "file_sha256", "kernel_folders", "private_folder"]


class UnsafeFolder(OSError):
    """A folder peftkit will not keep compiled code in (another owner, group/world-writable, a link)."""


def cache_dir() -> Path:
    """The folder holding converted models, measured peaks and kernels (``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``)."""
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit")).expanduser()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def kernel_folders() -> tuple[Path, Path]:
    """Where compiled kernels go, in order: the cache's ``kernels`` folder, then this user's folder in the temp
    dir (for a read-only or unsafe cache)."""
    return cache_dir() / "kernels", Path(tempfile.gettempdir()) / f"peftkit-kernels-{os.getuid()}"


def private_folder(folder: Path) -> Path:
    """`folder`, created with mode 0700 if missing (its parents as usual), checked to be private to this user.

    Raises:
        UnsafeFolder: `folder` is a symbolic link or not a folder, is owned by another user, or is writable by its
            group or others.
        OSError: it cannot be created.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeFolder(f"{folder} is not a folder (a link or a file)")
    if info.st_uid != os.getuid():
        raise UnsafeFolder(f"{folder} is owned by uid {info.st_uid}, not this user ({os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFolder(f"{folder} is writable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                           f"`chmod go-w {folder}` makes it usable")
    return folder
