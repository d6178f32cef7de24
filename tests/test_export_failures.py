"""Honest failure: damaged or foreign exports are refused with the file and the problem named;
students that cannot be exported are refused with the layer named; writes are atomic."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qdiff
from qdiff.config import AuxConfig, ExportConfig, QuantConfig, RunConfig
from qdiff.export import (FORMAT_VERSION, ExportFormatError, ExportMismatchError, QuantizedUNet2DConditionModel,
                          check_export, export_pipeline)
from qdiff.export.serialization import sha256_file
from qdiff.families import family_for
from qdiff.finetune import _export
from qdiff.quant import iter_quant_layers

from conftest import micro_class_ldm_pipeline, micro_student

QUANT = QuantConfig(weight_bits=4, act_bits=4, split_concat_inputs=True)
WEIGHTS = "diffusion_pytorch_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread", "quiet")


@pytest.fixture(scope="module")
def pipe():
    return micro_class_ldm_pipeline()


def _student(pipe, calibrate=True, aux=None):
    return micro_student(pipe, QUANT, aux, calibrate)


@pytest.fixture(scope="module")
def pristine(pipe, tmp_path_factory):
    return export_pipeline(pipe, _student(pipe), tmp_path_factory.mktemp("ok") / "export", QUANT)


@pytest.fixture
def export(pristine, tmp_path):
    """A fresh copy of a good export, to damage."""
    return shutil.copytree(pristine, tmp_path / "export")


def _load_unet(folder):
    return QuantizedUNet2DConditionModel.from_pretrained(folder / "unet")


def _edit_config(folder, edit):
    path = folder / "unet" / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


def _rewrite_weights(folder, edit):
    """Change the tensors and record the new checksum, as a buggy tool would."""
    path = folder / "unet" / WEIGHTS
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    _edit_config(folder, lambda q: q.update(weights_sha256=sha256_file(path)))


def test_truncated_weights_are_refused_naming_the_file(export):
    path = export / "unet" / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ExportFormatError, match=rf"{WEIGHTS}: truncated \(\d+ of \d+ bytes\)"):
        # through diffusers' pipeline loading, unchanged; without the manifest's check (it
        # would name the file first) the weights file's own checksum still refuses it
        qdiff.load_pipeline(export, verify=False)


def test_file_cut_inside_its_header_is_refused(export):
    path = export / "unet" / WEIGHTS
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ExportFormatError, match="truncated"):
        _load_unet(export)


def test_a_changed_byte_is_refused_as_modified(export):
    path = export / "unet" / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ExportFormatError, match=f"{WEIGHTS}: checksum mismatch.*modified after export"):
        _load_unet(export)


def test_appended_bytes_are_refused(export):
    path = export / "unet" / WEIGHTS
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(ExportFormatError, match="8 unexpected bytes after the tensor data"):
        _load_unet(export)


def test_missing_weights_file_is_refused(export):
    (export / "unet" / WEIGHTS).unlink()
    with pytest.raises(ExportFormatError, match=f"{WEIGHTS}: missing"):
        _load_unet(export)


def test_missing_tensor_is_named(export):
    _rewrite_weights(export, lambda t: t.pop("conv_in.act.scale"))
    with pytest.raises(ExportFormatError, match=f"{WEIGHTS}: tensor 'conv_in.act.scale' is missing"):
        _load_unet(export)


def test_codes_of_the_wrong_dtype_are_refused(export):
    key = "conv_in.weight_packed"
    _rewrite_weights(export, lambda t: t.update({key: t[key].long()}))
    with pytest.raises(ExportFormatError, match=f"'{key}' is torch.int64, the model needs torch.uint8"):
        _load_unet(export)


def test_unknown_format_version_is_refused(export):
    _edit_config(export, lambda q: q.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ExportFormatError, match=rf"config.json: export format version {FORMAT_VERSION + 1} .* newer qdiff"):
        _load_unet(export)


def test_layer_map_must_match_the_model(export):
    _edit_config(export, lambda q: q["layers"].update({"conv_nope": q["layers"]["conv_in"]}))
    with pytest.raises(ExportFormatError, match="layer 'conv_nope' does not exist"):
        _load_unet(export)


def test_malformed_layer_entries_are_refused(export):
    _edit_config(export, lambda q: q["layers"]["conv_in"].update(weight_bits=9))
    with pytest.raises(ExportFormatError, match="config.json: layer 'conv_in': bits must be integers"):
        _load_unet(export)


def test_a_float_model_folder_is_not_taken_for_an_export(pipe, tmp_path):
    pipe.unet.save_pretrained(tmp_path)
    with pytest.raises(ExportFormatError, match="holds a UNet2DConditionModel"):
        QuantizedUNet2DConditionModel.from_pretrained(tmp_path)


def test_unsupported_loading_options_are_refused(pristine):
    with pytest.raises(NotImplementedError, match="device_map"):
        QuantizedUNet2DConditionModel.from_pretrained(pristine / "unet", device_map="auto")


def test_export_refuses_a_student_that_still_has_phi(pipe, tmp_path):
    student = _student(pipe, aux=AuxConfig(enabled=True, rank=2))
    with pytest.raises(ValueError, match=r"Phi is still present in \d+ layer\(s\): conv_in \(rank 2\)"):
        export_pipeline(pipe, student, tmp_path / "export", QUANT)
    assert not any(tmp_path.iterdir())


def test_export_refuses_an_uncalibrated_student(pipe, tmp_path):
    with pytest.raises(ValueError, match="layer 'conv_in'.* not calibrated"):
        export_pipeline(pipe, _student(pipe, calibrate=False), tmp_path / "export", QUANT)


def test_an_interrupted_export_leaves_the_previous_one_untouched(pipe, pristine, tmp_path, monkeypatch):
    out = shutil.copytree(pristine, tmp_path / "export")
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(type(pipe.vae), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_pipeline(pipe, _student(pipe), out, QUANT)
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial folder left behind


def test_export_over_an_existing_one_replaces_it(pipe, pristine, tmp_path):
    out = shutil.copytree(pristine, tmp_path / "export")
    (out / "stale.txt").write_text("from an older export")
    export_pipeline(pipe, _student(pipe), out, QUANT)
    assert not (out / "stale.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["export"]
    assert isinstance(qdiff.load_pipeline(out).unet, QuantizedUNet2DConditionModel)


def test_loaded_codes_do_not_depend_on_the_file(export):
    """The model owns its tensors: a view of the file's memory map would keep every page
    it touched resident (and change when the file does)."""
    unet = _load_unet(export)
    before = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    path = export / "unet" / WEIGHTS
    with path.open("r+b") as handle:  # overwrite in place: same inode, same size
        handle.seek(4096)
        handle.write(b"\x00" * (path.stat().st_size - 4096))
    after = unet.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_runs_export_is_checked_against_its_student(pipe, tmp_path, caplog):
    student, family = _student(pipe), family_for(pipe)
    cfg = RunConfig(quant=QUANT, export=ExportConfig(dir=str(tmp_path / "export")))
    with caplog.at_level("INFO", logger="qdiff.finetune"):
        out = _export(family, student, cfg, tmp_path)
    assert "export checked" in caplog.text
    errors = check_export(family, {"unet": student}, {"unet": _load_unet(out)}, guidance=2.0)
    assert sorted(errors) == sorted(name for name, _ in iter_quant_layers(student))
    assert max(errors.values()) < 2e-6


def test_an_export_that_does_not_reproduce_its_student_is_refused_and_not_written(pipe, tmp_path):
    """The check compares the export with a student whose one layer differs (its weight
    negated): that layer is named, and nothing is left where the export was to go."""
    student, family = _student(pipe), family_for(pipe)
    other = copy.deepcopy(student)
    name, layer = list(iter_quant_layers(other))[5]
    with torch.no_grad():
        layer.base_layer.weight.neg_()

    def check(folder):
        check_export(family, {"unet": other}, {"unet": _load_unet(folder)}, guidance=2.0)
    with pytest.raises(ExportMismatchError, match=rf"worst relative error {name} \(\d"):
        export_pipeline(pipe, student, tmp_path / "export", QUANT, check=check)
    assert not any(tmp_path.iterdir())


def test_an_export_whose_layer_gives_nan_is_refused(pipe, tmp_path):
    """NaN compares false with any tolerance: the check must not read it as a match."""
    student, family = _student(pipe), family_for(pipe)
    other = copy.deepcopy(student)
    name, layer = list(iter_quant_layers(other))[5]
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = float("nan")

    def check(folder):
        check_export(family, {"unet": other}, {"unet": _load_unet(folder)}, guidance=2.0)
    with pytest.raises(ExportMismatchError, match=r"worst relative error \S+ \(nan\)"):
        export_pipeline(pipe, student, tmp_path / "export", QUANT, check=check)
    assert not any(tmp_path.iterdir())
