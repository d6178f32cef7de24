"""Size and SHA-256 of files, and the first way a folder differs from what was recorded.

Checkpoints (`qdiff.distill.checkpoint`) and exports (`qdiff.export.manifest`) both record
`{relative path: {"size": bytes, "sha256": hex}}` for the files they write, and check them
when read back: a flipped bit in a safetensors file can load into wrong numbers without
any error, and only a checksum notices. Each caller turns a problem into its own error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

Entries = dict[str, dict[str, Any]]
_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in blocks so that a large weight file is not held in memory.

    Args:
        path: The file to hash.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path, names: Iterable[str]) -> Entries:
    """`{name: {"size", "sha256"}}` of the files `names` (paths relative to `folder`).

    Args:
        folder: The folder the names are relative to.
        names: The files to describe.

    Returns:
        `{name: {"size": bytes, "sha256": hex digest}}`.
    """
    return {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
            for name in sorted(names)}


def files_under(folder: Path, skip: Iterable[str] = ()) -> list[str]:
    """Every regular file below `folder` as a POSIX path relative to it, but `skip`.

    Args:
        folder: The folder to list.
        skip: Relative paths to leave out.

    Returns:
        The paths, sorted.
    """
    skipped = set(skip)
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                  if path.is_file() and path.relative_to(folder).as_posix() not in skipped)


def well_formed(entries: Any) -> bool:
    """Whether `entries` (read from JSON) has the shape `describe_files` writes.

    Args:
        entries: The value read from JSON.

    Returns:
        True when it is a mapping of names to `{"size": int, "sha256": str}`.
    """
    return isinstance(entries, Mapping) and all(
        isinstance(name, str) and _inside(name) and isinstance(entry, Mapping)
        and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        for name, entry in entries.items())


def _inside(name: str) -> bool:
    """A relative path that stays inside its folder (a recorded name is never trusted)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def first_problem(folder: Path, entries: Mapping[str, Mapping[str, Any]]) -> str | None:
    """What is wrong with the first recorded file that is missing, of another size or of
    another checksum, as "<name> missing" / "<name> size ..." / "<name> checksum mismatch";
    None when every recorded file is as recorded. Files not recorded are not looked at.

    Args:
        folder: The folder the recorded names are relative to.
        entries: What `describe_files` recorded.

    Returns:
        A one-line description of the first problem, or None.
    """
    for name, entry in sorted(entries.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} size {size} bytes, {entry['size']} written"
        if sha256_file(path) != entry["sha256"]:
            return f"{name} checksum mismatch"
    return None
