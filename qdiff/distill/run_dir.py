"""A run folder is a transaction: one run at a time, and nothing of a previous run is lost
to a run that fails before it starts.

`open_run_folder` is what `python -m qdiff.finetune` does before it trains:

- **Lock.** The folder is locked (`fcntl.flock` on `<run dir>/.lock`) for the whole run; a
  second run into the same folder is refused by name and pid. The operating system drops
  the lock when the process ends, however it ends, so a crashed run never blocks the next.
- **Litter.** Holding the lock, the run removes what a killed run left behind: the export's
  staging folders (`.export.partial-*`, `.export.old-*`; an `.old-` one is put back when
  its export is missing, as it is then the only copy), unfinished checkpoints
  (`checkpoints/*.tmp`), and previous runs an `--overwrite` had already discarded.
- **Overwrite.** `--overwrite` moves the previous run into `.overwritten-<id>/` inside the
  folder, and deletes it only once the new run has passed set-up (`RunFolder.commit`: the
  teacher loaded, the student quantized and calibrated); a failure or Ctrl-C before then
  puts the previous run back. A set-aside run found by a later run (its process was
  killed during set-up) is put back too.
- **Resume.** `--resume` compares the run's saved `config.yaml` with the new config and
  refuses a change to what the student is (`check_resume_config`), unless
  `--allow-config-change`; `truncate_log` drops the log lines of the steps the resumed
  run will train again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from qdiff.config import ConfigError, RunConfig, load_config
from qdiff.distill.checkpoint import checkpoint_dir, latest_checkpoint
from qdiff.errors import QdiffError

logger = logging.getLogger("qdiff.run_dir")

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
SET_ASIDE = ".overwritten-"  # a previous run, kept until the new one has passed set-up
DISCARDED = ".discarded-"  # a previous run being deleted after the new one passed set-up

RESUMABLE_CHANGES = (
    "name", "output_dir",
    "distill.steps", "distill.checkpoint_every", "distill.sample_every", "distill.log_every",
    "distill.divergence_factor", "distill.gradient_checkpointing",
    "eval.*", "export.*",
)
"""Config keys a `--resume` may change; any other change is refused (`check_resume_config`).

Each leaves the student the run trains what it was: where the run's files go (`name`,
`output_dir`: a moved run folder), how often it writes them (`checkpoint_every` stays a
multiple of the trajectory length, which the config checks), when it stops (`steps`, the
usual "train longer" -- it stretches the learning rate's linear decay from the resumed step
on, which is what training longer means), how it watches itself (`divergence_factor`),
memory against time (`gradient_checkpointing` recomputes the same gradients), and what is
done with the student afterwards (`eval.*`, `export.*`). Not `distill.steps` where Phi's
rank decay is spread over the run (`aux.enabled` without `aux.phase_steps`): the decay's
schedule, and so the student's ranks at the resumed step, follow the step count.
"""


class RunFolderBusyError(QdiffError):
    """Another process holds the run folder's lock."""


class ResumeConfigError(ConfigError):
    """`--resume` with a config that would train a different student than the run's."""


@dataclass
class RunFolder:
    """An open run folder: locked, and holding the previous run aside under `--overwrite`."""

    path: Path
    lock_fd: int
    set_aside: Path | None = None

    def commit(self) -> None:
        """The new run has passed set-up: delete the previous run that was set aside.

        Renamed first, so that a kill during the deletion leaves litter, not a previous run
        that a later run would put back over this one."""
        if self.set_aside is None:
            return
        doomed = self.path / (DISCARDED + self.set_aside.name[len(SET_ASIDE):])
        os.replace(self.set_aside, doomed)
        self.set_aside = None
        shutil.rmtree(doomed, ignore_errors=True)
        logger.info("--overwrite: deleted the previous run in %s", self.path)

    def restore(self) -> None:
        """Put the set-aside previous run back (set-up failed)."""
        if self.set_aside is None:
            return
        _move_entries(self.set_aside, self.path, replace=True)
        self.set_aside.rmdir()
        self.set_aside = None
        logger.info("--overwrite: the new run did not start; the previous run in %s is back",
                    self.path)

    def release(self) -> None:
        os.close(self.lock_fd)  # closing the last descriptor drops the flock


@contextmanager
def open_run_folder(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
                    allow_config_change: bool = False) -> Iterator[RunFolder]:
    """Lock and tidy `cfg.run_dir`, check a resume's config, set a previous run aside.

    The block runs the run; it calls `commit()` once set-up has passed. Leaving the block
    with an exception before that puts the previous run back; leaving it normally commits.
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run and --overwrite discards it: pass one.")
    run_dir = make_run_dir(cfg.run_dir)
    folder = RunFolder(run_dir, acquire_lock(run_dir))
    try:
        recover_set_aside(run_dir)
        remove_litter(run_dir)
        has_run = latest_checkpoint(run_dir) is not None
        if has_run and not (resume or overwrite):
            raise ConfigError(f"{run_dir} already holds checkpoints of a run. Pass --resume to "
                              f"continue it, --overwrite to start again, or name=<new name>.")
        if resume and has_run:
            check_resume_config(run_dir / CONFIG_FILE, cfg, allow_config_change)
        if overwrite:
            folder.set_aside = set_aside(run_dir)
        try:
            yield folder
        except BaseException:
            folder.restore()
            raise
        folder.commit()
    finally:
        folder.release()


def make_run_dir(run_dir: Path) -> Path:
    """Create the run folder; a file in its place is refused by name (an unwritable or full
    disk surfaces as the OSError naming the path, which the command prints as one line)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run folder: choose another name=<name> "
                          f"or output_dir=<folder>.")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def acquire_lock(run_dir: Path) -> int:
    """Lock `run_dir` for this process (non-blocking); returns the lock file's descriptor.

    The lock file holds the owner's pid, so that a refused run can name it."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        owner = _lock_owner(path)
        raise RunFolderBusyError(
            f"{run_dir} is in use by another run{f' (pid {owner})' if owner else ''}: wait for "
            f"it to finish, or start this one in another folder with name=<other name>.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _run_entries(run_dir: Path) -> list[Path]:
    """What a run wrote into its folder: everything but the lock and set-aside runs."""
    return [entry for entry in run_dir.iterdir() if entry.name != LOCK_FILE
            and not entry.name.startswith((SET_ASIDE, DISCARDED))]


def _move_entries(source: Path, target: Path, replace: bool = False) -> None:
    for entry in sorted(source.iterdir()):
        destination = target / entry.name
        if replace and destination.exists():  # written by the run that is being undone
            _remove(destination)
        os.replace(entry, destination)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def set_aside(run_dir: Path) -> Path | None:
    """Move the previous run's files into `.overwritten-<id>/`; None if there were none."""
    entries = _run_entries(run_dir)
    if not entries:
        return None
    aside = run_dir / f"{SET_ASIDE}{uuid.uuid4().hex[:8]}"
    aside.mkdir()
    for entry in entries:
        os.replace(entry, aside / entry.name)
    logger.info("--overwrite: the previous run in %s is set aside until this one has started",
                run_dir)
    return aside


def recover_set_aside(run_dir: Path) -> None:
    """Put back a previous run that an `--overwrite` set aside and never committed (its
    process died during set-up, before the new run wrote anything)."""
    for aside in sorted(run_dir.glob(SET_ASIDE + "*")):
        if _run_entries(run_dir):
            logger.warning("%s holds a previous run that an interrupted --overwrite set aside, "
                           "and the folder holds another run: left as it is", aside)
            continue
        _move_entries(aside, run_dir)
        aside.rmdir()
        logger.warning("put back the previous run in %s, which an interrupted --overwrite had "
                       "set aside", run_dir)


def remove_litter(run_dir: Path) -> list[str]:
    """Remove what killed runs left in `run_dir`; returns the removed names (logged).

    An export's `.old-` folder whose export is missing was killed between the two renames
    of `qdiff.export.pipeline._replace_dir`: it is the only copy, so it is put back."""
    removed = []
    for old in sorted(run_dir.glob(".*.old-*")):
        export = run_dir / old.name[1:].rsplit(".old-", 1)[0]
        if old.is_dir() and not export.exists():
            os.replace(old, export)
            logger.warning("put back %s, which an interrupted export had moved aside", export)
    litter = [*run_dir.glob(".*.partial-*"), *run_dir.glob(".*.old-*"),
              *run_dir.glob(DISCARDED + "*"), *checkpoint_dir(run_dir).glob("*.tmp")]
    for path in sorted(litter):
        _remove(path)
        removed.append(str(path.relative_to(run_dir)))
    if removed:
        logger.info("removed what interrupted runs left in %s: %s", run_dir, ", ".join(removed))
    return removed


def truncate_log(path: Path, step: int) -> int:
    """Keep the log records of steps up to `step` (where the run resumes); returns how many
    lines were dropped. Also drops a line a kill cut short. Written to a temporary file and
    renamed, so a crash leaves the old log or the new one."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
        partial.write_text("".join(line + "\n" for line in kept))
        os.replace(partial, path)
    return dropped


def resolved(cfg: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


def _saved_config(path: Path) -> dict[str, Any]:
    """The run's saved config, its missing keys (an older qdiff) at their defaults."""
    try:
        return resolved(load_config(path))
    except ConfigError:  # a key this qdiff no longer knows: compare what was written
        return yaml.safe_load(path.read_text()) or {}


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{dotted key: (old, new)}` for every value that differs."""
    old_flat, new_flat = _flatten(saved), _flatten(new)
    missing = "<absent>"
    return {key: (old_flat.get(key, missing), new_flat.get(key, missing))
            for key in sorted(old_flat.keys() | new_flat.keys())
            if old_flat.get(key, missing) != new_flat.get(key, missing)}


def refused_changes(changes: dict[str, tuple[Any, Any]], cfg: RunConfig) -> list[str]:
    """The changed keys that `RESUMABLE_CHANGES` does not allow for this config."""
    steps_follow_run = cfg.aux.enabled and cfg.aux.phase_steps is None
    return [key for key in changes
            if not any(fnmatch(key, allowed) for allowed in RESUMABLE_CHANGES)
            or (key == "distill.steps" and steps_follow_run)]


def check_resume_config(path: Path, cfg: RunConfig, allow: bool = False) -> None:
    """Refuse to resume the run whose config is saved at `path` under a config that trains a
    different student; with `allow` (`--allow-config-change`), warn and go on."""
    if not path.is_file():
        logger.warning("%s is missing: the resumed run's config cannot be compared", path)
        return
    changes = config_changes(_saved_config(path), resolved(cfg))
    if not changes:
        return
    listed = "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())
    refused = refused_changes(changes, cfg)
    if not refused:
        logger.info("resuming with changed settings: %s", listed)
        return
    if allow:
        logger.warning("--allow-config-change: resuming with a changed student (%s); the "
                       "run's config.yaml will say the new values", listed)
        return
    shown = "; ".join(f"{key}: {changes[key][0]} -> {changes[key][1]}" for key in refused)
    raise ResumeConfigError(
        f"{path.parent} was trained with another config ({shown}): resume with the run's "
        f"values, start a new run (name=<new name> or --overwrite), or pass "
        f"--allow-config-change to resume anyway.")
