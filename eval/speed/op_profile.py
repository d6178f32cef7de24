"""Where a denoiser forward spends its time: CPU time per operator, float teacher and exports.

    python -m eval.speed.op_profile                        # -> eval/results/speed/op-profile.md, .json
    python -m eval.speed.op_profile --before old.json      # the table beside an earlier run's
    python -m eval.speed.op_profile --quick --out /tmp/p   # small sizes (checks that it runs)

For each model of the speed suite (`eval.speed.speed`: the embedded teacher and the
SD-1.5-sized UNet), the float32 and bfloat16 teachers and the W4A8 and W4A4 exports (also
in bfloat16 where the CPU has it) on their default kernel run a few untimed forwards (the kernels' one-time preparation), then `torch.profiler`
records `--forwards` more. The table gives each operator's self CPU time per forward
(time in the operator itself, not in those it calls), the wall time per forward, and
what is left of it outside every operator: Python, module calls and dispatch.

`--before` takes this script's JSON from an earlier commit (run this file with that
commit's `qdiff` and `eval` first on `PYTHONPATH`), so one table shows where a change moved
the time; each side keeps its own provenance.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from eval.common.report import machine, markdown_head, results_dir, write_json, write_markdown
from eval.speed.speed import Case, digits_case, digits_inputs, sd_case, sd_inputs

RESULTS = results_dir("speed")
TEACHER_VARIANTS = ("float32", "bfloat16")
LOW_BIT = ("W4A8", "W4A4", "W4A8 bf16", "W4A4 bf16")  # the bf16 ones where the CPU has bfloat16
TOP = 14  # operators listed per model; the rest are summed into one row


def op_times(forward: Callable[[], None], forwards: int) -> tuple[dict[str, float], float]:
    """(self CPU seconds per operator, wall seconds) per forward, over `forwards` forwards."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(forwards):
            forward()
        wall = time.perf_counter() - start
    times: dict[str, float] = {}
    for event in prof.key_averages():
        key = operator_name(event.key)
        times[key] = times.get(key, 0.0) + event.self_cpu_time_total / 1e6 / forwards
    return times, wall / forwards


def operator_name(key: str) -> str:
    """The profiler's key, with torch.compile's per-graph names (hashes, graph numbers)
    merged into one row each: the compiled loops are the one-pass activation codes."""
    if key.startswith("## Call CompiledFxGraph"):
        return "compiled code (inductor)"
    return re.sub(r"^(Torch-Compiled Region): \d+/\d+$", r"\1", key)


def denoiser_call(case: Case, pipe) -> Callable[[], None]:
    """One denoiser forward on inputs made here, once (so only the forward is profiled)."""
    sample, t, context = (sd_inputs(pipe.unet, pipe.unet.dtype) if case.name == "sd15-unet"
                          else digits_inputs(pipe))
    return lambda: pipe.unet(sample, t, encoder_hidden_states=context)


@torch.inference_mode()
def profile_case(case: Case, forwards: int, warmup: int) -> dict:
    """Per variant: operator times and wall time of one denoiser forward."""
    out = {}
    for name in (n for n in (*TEACHER_VARIANTS, *LOW_BIT) if n in case.pipes):
        forward = denoiser_call(case, case.pipes[name])
        for _ in range(warmup):
            forward()
        ops, wall = op_times(forward, forwards)
        out[name] = {"ops": ops, "wall": wall}
    return {"name": case.name, "describe": case.describe, "variants": out}


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.2f}"


def _columns(after: dict, before: dict | None) -> list[tuple[str, dict]]:
    """The teachers (this run), then each low-bit variant before (if given) and now."""
    def low_bit(run: dict, label: str) -> list[tuple[str, dict]]:
        return [(f"{name}{label}", run["variants"][name]) for name in LOW_BIT if name in run["variants"]]
    teachers = [(name, after["variants"][name]) for name in TEACHER_VARIANTS if name in after["variants"]]
    return teachers + (low_bit(before, " (before)") + low_bit(after, " (after)") if before else low_bit(after, ""))


def case_table(after: dict, before: dict | None) -> list[str]:
    """Milliseconds per forward: the top operators, the rest, all operators, wall, overhead."""
    columns = _columns(after, before)
    ops = sorted({op for _, v in columns for op in v["ops"]},
                 key=lambda op: -max(v["ops"].get(op, 0.0) for _, v in columns))
    lines = ["| ms per forward | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for op in ops[:TOP]:
        lines.append(f"| `{op}` | " + " | ".join(_ms(v["ops"].get(op)) for _, v in columns) + " |")
    rest = [sum(t for op, t in v["ops"].items() if op not in ops[:TOP]) for _, v in columns]
    total = [sum(v["ops"].values()) for _, v in columns]
    lines += ["| other operators | " + " | ".join(map(_ms, rest)) + " |",
              "| **all operators** | " + " | ".join(map(_ms, total)) + " |",
              "| **wall time** | " + " | ".join(_ms(v["wall"]) for _, v in columns) + " |",
              "| outside operators (Python, dispatch) | " + " | ".join(
                  _ms(max(v["wall"] - t, 0.0)) for (_, v), t in zip(columns, total)) + " |"]
    return lines


def report(results: dict, before: dict | None, out: Path, command: str) -> Path:
    write_json(out / "op-profile.json", {"command": command, **results})
    head = ("Self CPU time per operator and forward (`torch.profiler`; the profiler's own cost "
            "inflates the wall time alike for every column). Exports on their default kernel "
            "(\"auto\"). Each column is one variant profiled in this process"
            + ("; the \"before\" columns are from the run below, at an earlier commit." if before else "."))
    lines = markdown_head("Where a denoiser forward spends its time", command, results["machine"], head)
    if before:
        lines += [f"Before: `{before['command']}` at commit {before['provenance']['git_commit'][:12]} "
                  f"({before['machine']}).", ""]
    for case in results["cases"]:
        previous = next((c for c in before["cases"] if c["name"] == case["name"]), None) if before else None
        lines += [f"## {case['name']}", "", case["describe"], "", *case_table(case, previous), ""]
    path = out / "op-profile.md"
    write_markdown(path, "\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,sd")
    parser.add_argument("--quick", action="store_true", help="the SD-sized model at a tenth of its width")
    parser.add_argument("--forwards", type=int, default=None, help="profiled forwards per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--before", type=Path, help="this script's JSON from an earlier commit")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of op-profile.md and op-profile.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = json.loads(args.before.read_text()) if args.before else None
    cpu = machine()["cpu"]
    results = {"machine": f"CPU ({torch.backends.cpu.get_cpu_capability()}, {cpu}), {args.threads} thread(s), "
                          f"torch {torch.__version__}", "cases": []}
    with tempfile.TemporaryDirectory(prefix="qdiff-profile-") as tmp:
        if "digits" in args.models:
            case = digits_case(Path(tmp), steps=20, calibration_samples=2)
            results["cases"].append(profile_case(case, args.forwards or 20, warmup=3))
            del case
        if "sd" in args.models:
            case = sd_case(Path(tmp), args.quick, steps=2)
            results["cases"].append(profile_case(case, args.forwards or 3, warmup=2))
    command = "python -m eval.speed.op_profile" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    print(report(results, before, args.out, command).read_text())


if __name__ == "__main__":
    main()
