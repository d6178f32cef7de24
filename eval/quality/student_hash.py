"""The SHA-256 of a short distillation's trained student: a code change that should not change
training is checked by running this in both checkouts.

    python -m eval.quality.student_hash configs/tiny-ldm-w4a4.yaml
    git worktree add /tmp/old REV && (cd /tmp/old && python /path/to/eval/quality/student_hash.py \\
        configs/tiny-ldm-w4a4.yaml)          # the same in the old checkout: qdiff from cwd

40 steps at batch 4 after calibrating on 4 trajectories (key=value overrides change them),
one thread, no sample grids; prints the hash of the trainable state (name, values) and the
first logged losses. Equal hashes: the change trains bit-identical students.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, ".")  # the checkout it runs in, also when the script lives elsewhere

SHORT = ["distill.steps=40", "quant.calibration_samples=4", "distill.batch_size=4",
         "distill.checkpoint_every=20", "distill.sample_every=1000"]


def student_hash(config: str, overrides: list[str]) -> tuple[str, list[float]]:
    import qdiff
    from qdiff.config import load_config
    from qdiff.distill.checkpoint import _trainable_state
    from qdiff.distill.loop import distill

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [*SHORT, *overrides, f"output_dir={out}"])
        pipe = qdiff.load_pipeline(cfg.model.path)
        pipe.set_progress_bar_config(disable=True)
        state = _trainable_state(distill(pipe, cfg, cfg.run_dir))
        losses = [json.loads(line)["loss"] for line in (cfg.run_dir / "log.jsonl").open()]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].float().numpy().tobytes())
    return digest.hexdigest()[:16], losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value")
    args = parser.parse_args()
    digest, losses = student_hash(str(args.config), args.overrides)
    print(f"student sha256 {digest}; losses of the first logged steps {losses[:4]}")


if __name__ == "__main__":
    main()
