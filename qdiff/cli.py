"""What every `python -m qdiff.*` command does with bad input and failures.

- A user's mistake (`QdiffError`, a missing file, a folder that cannot be written, a full
  disk) is printed as one line, `error: ...`, and the command exits with status 2.
- Ctrl-C prints one line saying how to continue, and exits with status 130.
- A bug keeps its traceback. `--debug` (or `QDIFF_DEBUG=1`) shows the traceback of every
  error, a user's mistake included.

The argparse types below refuse a number that is out of range or not finite before any
work starts; `writable_output`, `writable_folder` and `pipeline_folder` refuse an output
that cannot be written and a pipeline folder that is not one, also before any work.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from qdiff.errors import QdiffError

T = TypeVar("T")
USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report it
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


class InputError(QdiffError, ValueError):
    """A command-line argument names a file or folder that cannot be used as asked."""


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (or set QDIFF_DEBUG=1)")


def debug_enabled(args: Optional[argparse.Namespace] = None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("QDIFF_DEBUG", "") not in ("", "0")


def describe_os_error(error: OSError) -> str:
    """One line for a file-system failure: the path, what happened, and what to do."""
    path = error.filename or "a file"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: {_DISK_ERRNOS[error.errno]}; free some space or choose another folder."
    if error.errno in _DISK_ERRNOS:
        return (f"{path}: {_DISK_ERRNOS[error.errno]}; choose a folder you can write to "
                f"(or fix its permissions).")
    if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return str(error) if error.filename is None else f"{path}: {error.strerror}."
    return f"{path}: {error.strerror or error}."


def run_main(body: Callable[[], T], args: Optional[argparse.Namespace] = None,
             interrupted: str | Callable[[], str] = "") -> T:
    """Run a command's `body`; turn a user's mistake into one line and an exit status.

    `interrupted` is what to tell the user after Ctrl-C (for example how to resume), or a
    function that says it then (when it depends on how far the command got).

    Args:
        body: The command's work, called with no arguments.
        args: The parsed arguments; their `debug` (or `QDIFF_DEBUG`) lets every error
            propagate with its traceback.
        interrupted: The message after Ctrl-C, or a function returning it.

    Returns:
        What `body` returns.

    Raises:
        SystemExit: On a `QdiffError`, a missing path or a full disk (usage status), or on
            Ctrl-C (interrupted status), after printing one line to stderr.
    """
    debug = debug_enabled(args)
    try:
        return body()
    except KeyboardInterrupt:
        if debug:
            raise
        text = interrupted() if callable(interrupted) else interrupted
        print(f"interrupted{': ' + text if text else ''}", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except QdiffError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except OSError as error:
        user_fault = (isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError))
                      or error.errno in _DISK_ERRNOS)
        if debug or not user_fault:
            raise
        message = str(error) if type(error) is FileNotFoundError and error.filename is None \
            else describe_os_error(error)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def _number(kind: Callable[[str], T], text: str) -> T:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a{'n integer' if kind is int else ' number'}")
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def _at_least(kind: Callable[[str], T], low: T, strict: bool = False,
              name: str = "") -> Callable[[str], T]:
    """An argparse type: a finite `kind` number of at least `low` (more than `low` when
    `strict`)."""
    def parse(text: str) -> T:
        value = _number(kind, text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(
                f"{value} must be more than {low:g}" if strict else f"{value} must be {low:g} or more")
        return value
    parse.__name__ = name  # argparse names the type in its own messages
    return parse


positive_int = _at_least(int, 1, name="positive_int")
nonnegative_int = _at_least(int, 0, name="nonnegative_int")
nonnegative_float = _at_least(float, 0.0, name="nonnegative_float")
positive_float = _at_least(float, 0.0, strict=True, name="positive_float")


def sample_size(text: str) -> tuple[int, ...]:
    """An argparse type: HEIGHT,WIDTH or FRAMES,HEIGHT,WIDTH, each 1 or more."""
    try:
        size = tuple(int(part) for part in text.split(","))
    except ValueError:
        size = ()
    if len(size) not in (2, 3) or min(size) < 1:
        raise argparse.ArgumentTypeError(f"takes HEIGHT,WIDTH (images) or FRAMES,HEIGHT,WIDTH "
                                         f"(videos), each 1 or more, e.g. 5,16,16; got '{text}'")
    return size


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(folder: Path, option: str, shown: Path) -> None:
    """`folder` exists as a folder or can be made, and a file can be written where it will be.

    Nothing is left behind: the nearest existing folder is probed with a temporary file
    (permission bits alone do not tell, e.g. on a read-only file system or as root).
    """
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise InputError(f"{option} {shown}: {existing} is a file, so no folder can be made "
                         f"there; choose another path.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise InputError(f"{option} {shown}: cannot write in {existing} ({reason}); choose a "
                         f"folder you can write to (or fix its permissions).") from None


def writable_output(path: Path, option: str = "--out") -> Path:
    """Refuse an output file that cannot be written, before any work starts; create nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file path inside it.")
    _check_creatable(path.parent, option, path)
    return path


def writable_folder(path: Path, option: str = "out") -> Path:
    """Refuse an output folder that exists with files in it, or cannot be made or written.

    A command that writes a whole folder never mixes its files into another one's.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file; give the path of a new folder.")
    if path.is_dir() and any(path.iterdir()):
        raise InputError(f"{option} {path} exists and is not empty; remove it first or give "
                         f"a new folder (nothing was written).")
    _check_creatable(path, option, path)
    return path


def pipeline_folder(path: Path | str, option: str = "--pipeline") -> dict[str, Any]:
    """The model index of a pipeline folder; refuse a path that is not one, before loading.

    A missing path that reads as a hub id (`owner/name`) is left to the loader (empty dict).
    """
    from qdiff.models.hub import looks_like_hub_id
    from qdiff.models.loading import read_model_index  # late: it imports diffusers

    folder = Path(path)
    if not folder.exists():
        if looks_like_hub_id(str(path)):
            return {}
        raise InputError(f"{option} {path}: no such folder; give a pipeline folder (the one "
                         f"holding model_index.json), e.g. assets/tiny-ldm-digits.")
    index = folder / "model_index.json"
    if not index.is_file():
        raise InputError(f"{option} {path} is not a pipeline folder: it has no model_index.json; "
                         f"give the folder that save_pretrained wrote, e.g. assets/tiny-ldm-digits.")
    return read_model_index(folder)


def component_config(folder: Path | str, component: str, name: str = "config.json") -> dict[str, Any]:
    """A component's JSON config in a pipeline folder (empty dict when there is none)."""
    path = Path(folder) / component / name
    return _json_object(path) if path.is_file() else {}


def check_steps(folder: Path | str, steps: int, option: str = "--steps") -> None:
    """Refuse more sampling steps than the pipeline's scheduler has timesteps."""
    train_steps = component_config(folder, "scheduler", "scheduler_config.json").get(
        "num_train_timesteps")
    if isinstance(train_steps, int) and steps > train_steps:
        raise InputError(f"{option} {steps} exceeds the {train_steps} timesteps the pipeline "
                         f"was trained with; give {option} {train_steps} or fewer.")


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error}); re-export the pipeline.") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a valid pipeline config (no mapping); re-export the "
                         f"pipeline.")
    return data
