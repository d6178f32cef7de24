"""The one report writer of the benchmark suites, and the provenance every new report carries.

A suite's script writes `eval/results/<suite>/<name>.json` with `write_json` and its table
with `write_markdown`. The JSON schema (SCHEMA, version 1) is the script's own payload --
its rows, tables, cases, under the keys it always used, so readers of older reports keep
working -- with three keys added at the top:

    {"schema": "qdiff-eval-report/1",
     "report": "<suite>/<name>",
     "provenance": {"qdiff_version": "0.x", "git_commit": "<sha>", "git_dirty": false,
                    "torch_version": "2.x", "python": "3.x",
                    "command": "python -m eval.speed --quick",
                    "machine": {"cpu": "<model name>", "cores": 2, "platform": "Linux-...",
                                "flags": ["avx2", "avx512_vnni", ...]},
                    "created": "2026-01-01T00:00:00+00:00"},
     ...the script's payload...}

A Markdown table ends with one line naming the same provenance. Reports written before this
writer existed have no "provenance" key; eval/results/PROVENANCE.md recovers what it can
for them from git history (python -m eval.common.provenance).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "eval" / "results"
SCHEMA = "qdiff-eval-report/1"
# The CPU flags that decide which integer and bfloat16 kernels are fast.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
         "amx_bf16", "asimd", "sve", "i8mm", "bf16")


def results_dir(suite: str) -> Path:
    """eval/results/<suite>/, where the suite's reports go."""
    return RESULTS / suite


def command_line(argv: list[str] | None = None) -> str:
    """The command that runs this process, as `python -m eval.<module> args` when it was
    started with -m (sys.argv[0] is then the file's path, not what was typed)."""
    argv = list(sys.argv if argv is None else argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name.removesuffix(".__main__")
        return shlex.join(["python", "-m", name, *argv[1:]])
    return shlex.join(["python", *argv])


def machine() -> dict:
    """CPU model, core count, platform and the kernel-relevant CPU flags (from /proc/cpuinfo
    where there is one)."""
    cpu, flags = platform.processor() or "unknown model", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and cpu in ("unknown model", "", platform.machine()):
                cpu = value.strip()
            elif key in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "flags": [f for f in FLAGS if f in flags]}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance(command: str | None = None) -> dict:
    """Who made a report: qdiff and torch versions, the commit (and whether the work tree
    differed from it outside eval/results/), the machine and the command line."""
    try:
        import qdiff
        version = getattr(qdiff, "__version__", "unknown")
    except ImportError:
        version = "not importable"
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    # changes under eval/results/ are reports being (re)written, not the code that makes them
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)eval/results")
    return {"qdiff_version": version, "git_commit": _git("rev-parse", "HEAD") or "unknown",
            "git_dirty": None if status is None else bool(status),
            "torch_version": torch_version, "python": platform.python_version(),
            "command": command or command_line(), "machine": machine(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _report_name(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return path.relative_to(RESULTS).with_suffix("").as_posix()
    except ValueError:
        return path.stem


def report(path: Path, payload: dict, command: str | None = None) -> dict:
    """The JSON object of a report: schema, name and provenance, then the payload's keys."""
    clash = {"schema", "report", "provenance"} & set(payload)
    if clash:
        raise ValueError(f"a report's payload may not use the keys {sorted(clash)}")
    return {"schema": SCHEMA, "report": _report_name(path), "provenance": provenance(command), **payload}


def write_json(path: Path, payload: dict, command: str | None = None) -> dict:
    """Write `payload` with its provenance to `path` (the folder is made); return what was written."""
    document = report(path, payload, command)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return document


def provenance_line(prov: dict) -> str:
    m = prov["machine"]
    dirty = " (with uncommitted changes)" if prov.get("git_dirty") else ""
    flags = ", ".join(m["flags"]) or "none of " + "/".join(FLAGS[:4])
    return (f"Provenance: qdiff {prov['qdiff_version']}, commit {prov['git_commit'][:12]}{dirty}, "
            f"torch {prov['torch_version']}, {m['cpu']} ({m['cores']} cores; {flags}), "
            f"`{prov['command']}`, {prov['created']}.")


def markdown_head(title: str, command: str, *paragraphs: str) -> list[str]:
    """A report's first Markdown lines: the title, the command that made it, then each
    paragraph, each followed by a blank line."""
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    return lines


def write_markdown(path: Path, text: str, command: str | None = None) -> None:
    """Write a report's Markdown, ending with its provenance line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n\n" + provenance_line(provenance(command)) + "\n")
