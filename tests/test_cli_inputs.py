"""Every `python -m qdiff.*` command refuses bad input with one line and exit status 2.

Each case gives one bad input to a command's `main` (in-process), and pins the last line
of stderr; no traceback is printed and the output file is neither written nor changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from qdiff import sample
from qdiff.cli import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-ldm-digits")
OLD = b"an earlier result"


def _fails(main, argv: list[str], capsys) -> str:
    """Run `main(argv)`; it must exit 2 without a traceback. Returns the last stderr line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


SAMPLE_CASES = [
    (["--steps", "-5"], "argument --steps: -5 must be 1 or more"),
    (["--steps", "0"], "argument --steps: 0 must be 1 or more"),
    (["--steps", "5000"], ("error: --steps 5000 exceeds the 1000 timesteps the pipeline was "
                          "trained with; give --steps 1000 or fewer.")),
    (["--guidance", "inf"], "argument --guidance: 'inf' is not a finite number"),
    (["--guidance", "nan"], "argument --guidance: 'nan' is not a finite number"),
    (["--guidance", "-1"], "argument --guidance: -1.0 must be 0 or more"),
    (["--per-class", "0"], "argument --per-class: 0 must be 1 or more"),
    (["--seed", "-1"], "argument --seed: -1 must be 0 or more"),
    (["--classes", ""], ("argument --classes: takes comma-separated class ids (0 or more), "
                        "e.g. 3,5; got ''")),
    (["--classes", "3,x"], ("argument --classes: takes comma-separated class ids (0 or more), "
                           "e.g. 3,5; got '3,x'")),
    (["--classes", "3,10"], ("error: --classes 10: the pipeline {teacher} has classes 0..9; "
                            "give classes in that range.")),
    (["--pipeline", "{tmp}/nowhere"], ("error: --pipeline {tmp}/nowhere: no such folder; give a "
                                      "pipeline folder (the one holding model_index.json), "
                                      "e.g. assets/tiny-ldm-digits.")),
    (["--pipeline", "{tmp}"], ("error: --pipeline {tmp} is not a pipeline folder: it has no "
                              "model_index.json; give the folder that save_pretrained wrote, "
                              "e.g. assets/tiny-ldm-digits.")),
    (["--out", "/sys/qdiff-test/grid.png"], ("error: --out /sys/qdiff-test/grid.png: cannot write "
                                            "in /sys (permission denied); choose a folder you "
                                            "can write to (or fix its permissions).")),
    (["--out", "{tmp}/grid.png/sub/grid.png"], ("error: --out {tmp}/grid.png/sub/grid.png: "
                                               "{tmp}/grid.png is a file, so no folder can be "
                                               "made there; choose another path.")),
    (["--out", "{tmp}/grid.xyz"], ("argument --out: '{tmp}/grid.xyz' is a '.xyz' file, which PIL "
                                  "cannot write; end the name in .png (or .jpg, .webp)")),
    (["--out", "{tmp}/grid"], ("argument --out: '{tmp}/grid' has no image suffix; end the name "
                              "in .png (or .jpg, .webp)")),
]


@pytest.mark.parametrize("argv, message", SAMPLE_CASES, ids=[" ".join(a) for a, _ in SAMPLE_CASES])
def test_sample_refuses_bad_input_before_loading_the_pipeline(argv, message, tmp_path, capsys,
                                                              monkeypatch):
    out = tmp_path / "grid.png"
    out.write_bytes(OLD)
    before = _digest(out)
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
    fill = {"tmp": str(tmp_path), "teacher": TEACHER}
    argv = ["--pipeline", TEACHER, "--out", str(out)] + [part.format(**fill) for part in argv]
    line = _fails(sample.main, argv, capsys)
    assert line.endswith(message.format(**fill))
    assert _digest(out) == before


def test_sample_refuses_a_class_outside_a_pipeline_known_only_once_loaded(
        random_class_ldm_pipeline, tmp_path, monkeypatch):
    """A hub pipeline has no local config to read first: its classes are checked once loaded."""
    monkeypatch.setattr(sample, "load_pipeline", lambda path: random_class_ldm_pipeline)
    with pytest.raises(InputError, match=r"--classes 10: the pipeline owner/ldm has classes "
                                         r"0\.\.9; give classes in that range\."):
        sample.sample_grid("owner/ldm", [3, 10], 1, 1, 1.0, 0, tmp_path / "grid.png")
    assert not (tmp_path / "grid.png").exists()


def test_sample_accepts_debug(random_class_ldm_pipeline, tmp_path):
    random_class_ldm_pipeline.save_pretrained(tmp_path / "pipe")
    sample.main(["--pipeline", str(tmp_path / "pipe"), "--classes", "1", "--per-class", "1",
                 "--steps", "1", "--out", str(tmp_path / "grid.png"), "--debug"])
    assert (tmp_path / "grid.png").is_file()
