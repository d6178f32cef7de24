"""What every `python -m qdiff.*` command does with bad input and failures.

- A user's mistake (`QdiffError`, a missing file, a folder that cannot be written, a full
  disk) is printed as one line, `error: ...`, and the command exits with status 2.
- Ctrl-C prints one line saying how to continue, and exits with status 130.
- A bug keeps its traceback. `--debug` (or `QDIFF_DEBUG=1`) shows the traceback of every
  error, a user's mistake included.

The argparse types below refuse a number that is out of range or not finite before any
work starts.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from typing import Callable, Optional, TypeVar

from qdiff.errors import QdiffError

T = TypeVar("T")
USAGE_ERROR = 2
INTERRUPTED = 130  # 128 + SIGINT, as shells report it
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


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


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0")
    return value
