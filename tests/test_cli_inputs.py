"""Every `python -m qdiff.*` command refuses bad input with one line and exit status 2.

Each case gives one bad input to a command's `main` (in-process), and pins the last line
of stderr; no traceback is printed and the output file is neither written nor changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qdiff import sample
from qdiff.cli import InputError
from qdiff.convert.__main__ import main as convert_main
from qdiff.eval import cli as eval_cli

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


def _write_bad_npz(folder: Path) -> None:
    """One damaged or foreign file per way an ADM .npz can be wrong."""
    np.savez(folder / "good.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    whole = (folder / "good.npz").read_bytes()
    (folder / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    (folder / "text.npz").write_bytes(b"not an archive at all\n" * 8)
    np.save(folder / "single.npy", np.zeros(3))
    (folder / "single.npy").rename(folder / "single.npz")
    np.savez(folder / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(folder / "objects.npz", arr_0=np.array([{"a": 1}], dtype=object))
    np.savez(folder / "labels.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), arr_1=np.zeros(3))
    np.savez(folder / "stats.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(3),
             sigma=np.zeros((2, 2)), mu_s=np.zeros(2), sigma_s=np.eye(2))


NPZ_FIX = ("; give a file written by np.savez with arr_0: uint8 images (N, H, W, C), optional "
           "arr_1: N integer labels.")
EVAL_CASES = [
    (["--num-samples", "0"], "argument --num-samples: 0 must be 1 or more"),
    (["--batch-size", "0"], "argument --batch-size: 0 must be 1 or more"),
    (["--steps", "-3"], "argument --steps: -3 must be 1 or more"),
    (["--guidance", "nan"], "argument --guidance: 'nan' is not a finite number"),
    (["--seed", "-1"], "argument --seed: -1 must be 0 or more"),
    (["--metric", "fid,kid"], ("argument --metric: Unknown metric(s) ['kid']; choose from "
                               "['fid', 'sfid', 'is', 'precision', 'recall', 'accuracy'].")),
    (["--steps", "2000"], ("error: --steps 2000 exceeds the 1000 timesteps the pipeline was "
                           "trained with; give --steps 1000 or fewer.")),
    (["--pipeline", "{tmp}/nowhere"], ("error: --pipeline {tmp}/nowhere: no such folder; give "
                                       "a pipeline folder (the one holding model_index.json), "
                                       "e.g. assets/tiny-ldm-digits.")),
    (["--pipeline", "{tmp}/nowhere.npz"], ("error: --pipeline {tmp}/nowhere.npz: no such file; "
                                           "give an ADM .npz batch or a pipeline folder.")),
    (["--reference", "{tmp}/nowhere"], ("error: --reference {tmp}/nowhere: no such folder; give "
                                        "a pipeline folder (the one holding model_index.json), "
                                        "e.g. assets/tiny-ldm-digits.")),
    (["--pipeline", "{tmp}/truncated.npz"], ("error: {tmp}/truncated.npz is not a readable ADM "
                                             ".npz (File is not a zip file)" + NPZ_FIX)),
    (["--pipeline", "{tmp}/text.npz"], ("error: {tmp}/text.npz is not a readable ADM .npz "
                                        "(neither a zip archive of arrays nor a .npy array)"
                                        + NPZ_FIX)),
    (["--pipeline", "{tmp}/single.npz"], ("error: {tmp}/single.npz is not a readable ADM .npz "
                                          "(a single .npy array, not an archive of arrays)"
                                          + NPZ_FIX)),
    (["--pipeline", "{tmp}/floats.npz"], ("error: {tmp}/floats.npz is not a readable ADM .npz "
                                          "(arr_0 is float32 (4, 8, 8, 3), not uint8 "
                                          "(N, H, W, C) with N >= 1)" + NPZ_FIX)),
    (["--pipeline", "{tmp}/objects.npz"], ("error: {tmp}/objects.npz is not a readable ADM .npz "
                                           "(Object arrays cannot be loaded when "
                                           "allow_pickle=False)" + NPZ_FIX)),
    (["--pipeline", "{tmp}/labels.npz"], ("error: {tmp}/labels.npz is not a readable ADM .npz "
                                          "(arr_1 is float64 (3,), not 4 integer labels)"
                                          + NPZ_FIX)),
    (["--pipeline", "{tmp}/good.npz", "--reference", "{tmp}/truncated.npz"],
     "error: {tmp}/truncated.npz is not a readable ADM .npz (File is not a zip file)" + NPZ_FIX),
    (["--pipeline", "{tmp}/good.npz", "--reference", "{tmp}/stats.npz"],
     ("error: {tmp}/stats.npz is not a readable ADM .npz (mu float64 (3,) and sigma float64 "
      "(2, 2) are not a finite mean (D,) and covariance (D, D))" + NPZ_FIX)),
    (["--out", "/sys/qdiff-test/results.json"], ("error: --out /sys/qdiff-test/results.json: "
                                                 "cannot write in /sys (permission denied); "
                                                 "choose a folder you can write to (or fix its "
                                                 "permissions).")),
    (["--out", "{tmp}/good.npz/results.json"], ("error: --out {tmp}/good.npz/results.json: "
                                                "{tmp}/good.npz is a file, so no folder can be "
                                                "made there; choose another path.")),
]


@pytest.mark.parametrize("argv, message", EVAL_CASES, ids=[" ".join(a) for a, _ in EVAL_CASES])
def test_eval_refuses_bad_input_before_sampling(argv, message, tmp_path, capsys, monkeypatch):
    _write_bad_npz(tmp_path)
    out = tmp_path / "out" / "results.json"
    out.parent.mkdir()
    out.write_bytes(OLD)
    monkeypatch.setattr(eval_cli, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
    fill = {"tmp": str(tmp_path)}
    argv = ["--pipeline", TEACHER, "--out", str(out)] + [part.format(**fill) for part in argv]
    line = _fails(eval_cli.main, argv, capsys)
    assert line.endswith(message.format(**fill))
    assert out.read_bytes() == OLD and sorted(p.name for p in out.parent.iterdir()) == ["results.json"]


CONVERT_CASES = [
    (["{tmp}/none.ckpt", "{out}"], ("error: No checkpoint at {tmp}/none.ckpt; give the path of a "
                                    ".ckpt or .safetensors file.")),
    (["{tmp}/truncated.ckpt", "{out}"], ("error: {tmp}/truncated.ckpt is not a readable PyTorch "
                                         "checkpoint (PytorchStreamReader failed reading zip "
                                         "archive: failed finding central directory); it may be "
                                         "truncated: compare its size and checksum with the "
                                         "original, or download it again.")),
    (["{tmp}/empty.ckpt", "{out}"], ("error: {tmp}/empty.ckpt is not a readable PyTorch "
                                     "checkpoint (the file ends early); it may be truncated")),
    (["{tmp}/text.ckpt", "{out}"], ("error: {tmp}/text.ckpt is not a readable PyTorch checkpoint "
                                    "(neither a zip nor a pickle checkpoint); it may be "
                                    "truncated")),
    (["{tmp}/tensor.ckpt", "{out}"], ("error: {tmp}/tensor.ckpt holds no state dict of tensors "
                                      "(found Tensor); give latent-diffusion's .ckpt (e.g. "
                                      "cin256-v2.ckpt) or a .safetensors file of its "
                                      "state_dict.")),
    (["{tmp}/other.safetensors", "{out}"], ("error: The checkpoint has no "
                                            "model.diffusion_model.input_blocks.0.0.weight: it is "
                                            "not a latent-diffusion class-conditional LDM (the "
                                            "layout of cin256-v2.ckpt).")),
    (["{tmp}/truncated.safetensors", "{out}"], ("error: {tmp}/truncated.safetensors is not a "
                                                "readable safetensors checkpoint (Error while "
                                                "deserializing header: incomplete metadata, file "
                                                "not fully covered); it may be truncated")),
    (["{tmp}/other.safetensors", "{tmp}/taken"], ("error: out {tmp}/taken exists and is not "
                                                  "empty; remove it first or give a new folder "
                                                  "(nothing was written).")),
    (["{tmp}/other.safetensors", "{tmp}/empty.ckpt"], ("error: out {tmp}/empty.ckpt is a file; "
                                                       "give the path of a new folder.")),
    (["{tmp}/other.safetensors", "/sys/qdiff-test"], ("error: out /sys/qdiff-test: cannot write "
                                                      "in /sys (permission denied); choose a "
                                                      "folder you can write to (or fix its "
                                                      "permissions).")),
    (["{tmp}/other.safetensors", "{out}", "--num-heads", "0"],
     "argument --num-heads: 0 must be 1 or more"),
    (["{tmp}/other.safetensors", "{out}", "--latent-size", "-1"],
     "argument --latent-size: -1 must be 1 or more"),
    (["{tmp}/other.safetensors", "{out}", "--scale-factor", "nan"],
     "argument --scale-factor: 'nan' is not a finite number"),
    (["{tmp}/other.safetensors", "{out}", "--scale-factor", "0"],
     "argument --scale-factor: 0.0 must be more than 0"),
]


def _write_bad_checkpoints(folder: Path) -> None:
    torch.save({"state_dict": {"a": torch.zeros(100)}}, folder / "whole.ckpt")
    whole = (folder / "whole.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "text.ckpt").write_bytes(b"hello world, not a checkpoint\n" * 8)
    torch.save(torch.zeros(3), folder / "tensor.ckpt")
    save_file({"unet.weight": torch.zeros(1000)}, folder / "other.safetensors")
    whole = (folder / "other.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (folder / "taken").mkdir()
    (folder / "taken" / "model_index.json").write_text("{}")


@pytest.mark.parametrize("argv, message", CONVERT_CASES, ids=[" ".join(a) for a, _ in CONVERT_CASES])
def test_convert_refuses_bad_input_and_writes_nothing(argv, message, tmp_path, capsys):
    _write_bad_checkpoints(tmp_path)
    before = {path: _digest(path) for path in tmp_path.rglob("*")}
    fill = {"tmp": str(tmp_path), "out": str(tmp_path / "pipe")}
    line = _fails(convert_main, ["ldm"] + [part.format(**fill) for part in argv], capsys)
    assert message.format(**fill) in line
    assert {path: _digest(path) for path in tmp_path.rglob("*")} == before


@pytest.mark.parametrize("main, argv, error", [
    (sample.main, ["--pipeline", "/nowhere"], InputError),
    (eval_cli.main, ["--pipeline", "/nowhere"], InputError),
    (convert_main, ["ldm", "/nowhere.ckpt", "/tmp/x", "--debug"], FileNotFoundError),
])
def test_every_cli_shows_the_traceback_with_debug(main, argv, error):
    with pytest.raises(error):
        main(argv + ([] if "--debug" in argv else ["--debug"]))
