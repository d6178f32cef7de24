"""Every file of an export is checksummed: a damaged component is refused by name at load,
a partial export has no manifest, and folders without one load as before."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from damage import cut, flip_bit, tensor_offset

import qdiff
from qdiff.checksums import sha256_file
from qdiff.config import QuantConfig
from qdiff.errors import QdiffError
from qdiff.export import ExportFormatError, export_pipeline
from qdiff.export.manifest import MANIFEST_FILE, content_id, verify_manifest

from conftest import micro_class_ldm_pipeline, micro_student

QUANT = QuantConfig(weight_bits=4, act_bits=4)
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread", "quiet")


@pytest.fixture(scope="module")
def pipe():
    return micro_class_ldm_pipeline()


def _student(pipe):
    return micro_student(pipe, QUANT)


@pytest.fixture(scope="module")
def pristine(pipe, tmp_path_factory):
    return export_pipeline(pipe, _student(pipe), tmp_path_factory.mktemp("ok") / "export", QUANT)


@pytest.fixture
def export(pristine, tmp_path):
    """A fresh copy of a good export, to damage."""
    return shutil.copytree(pristine, tmp_path / "export")


def test_the_manifest_lists_every_file_the_export_wrote(pristine):
    listed = json.loads((pristine / MANIFEST_FILE).read_text())["files"]
    written = sorted(p.relative_to(pristine).as_posix() for p in pristine.rglob("*")
                     if p.is_file() and p.name != MANIFEST_FILE)
    assert sorted(listed) == written and VAE_WEIGHTS in listed and "model_index.json" in listed
    for name, entry in listed.items():
        assert entry == {"size": (pristine / name).stat().st_size,
                         "sha256": sha256_file(pristine / name)}


def test_a_flipped_bit_in_the_autoencoder_is_refused_naming_the_file(pipe, export):
    path = export / VAE_WEIGHTS
    flip_bit(path, tensor_offset(path, "decoder.conv_out.bias") + 3, 6)
    # what the hostile user saw: it loads without a word, and decodes with a wrong weight
    unchecked = qdiff.load_pipeline(export, verify=False)
    assert not torch.equal(unchecked.vae.decoder.conv_out.bias, pipe.vae.decoder.conv_out.bias)
    with pytest.raises(ExportFormatError) as error:
        qdiff.load_pipeline(export)
    assert str(error.value) == (f"{export}: {VAE_WEIGHTS} checksum mismatch; the export was "
                                f"damaged after it was written. Re-export it (or copy it again).")
    assert isinstance(error.value, QdiffError)


@pytest.mark.parametrize("damage, reason", [
    (lambda e: cut(e / "class_embedder" / "diffusion_pytorch_model.safetensors"),
     r"class_embedder/diffusion_pytorch_model.safetensors size \d+ bytes, \d+ written"),
    (lambda e: (e / "scheduler" / "scheduler_config.json").unlink(), "scheduler/scheduler_config.json missing"),
    (lambda e: (e / "model_index.json").write_text((e / "model_index.json").read_text()
                                                   .replace("DDIMScheduler", "PNDMScheduler")),
     "model_index.json checksum mismatch"),  # same length: only the checksum tells
], ids=["cut", "missing", "edited"])
def test_a_cut_missing_or_edited_file_is_refused_naming_it(export, damage, reason):
    damage(export)
    with pytest.raises(ExportFormatError, match=f"^{export}: {reason}; .* Re-export it"):
        qdiff.load_pipeline(export)


def test_a_damaged_manifest_is_refused_and_a_newer_one_says_how_to_skip(export):
    manifest = export / MANIFEST_FILE
    cut(manifest)
    with pytest.raises(ExportFormatError, match=rf"^{manifest}: damaged \(JSONDecodeError\); "
                                                r"re-export the pipeline\.$"):
        qdiff.load_pipeline(export)
    manifest.write_text(json.dumps({"qdiff_manifest": 2, "files": {}}))
    with pytest.raises(ExportFormatError, match="newer than this qdiff.*verify=False"):
        qdiff.load_pipeline(export)
    manifest.write_text(json.dumps({"qdiff_manifest": 1, "files": {"../outside": {
        "size": 1, "sha256": "0" * 64}}}))  # a listed path never leaves the folder
    with pytest.raises(ExportFormatError, match="damaged"):
        qdiff.load_pipeline(export)


def test_files_added_later_are_not_an_error(export):
    (export / "README.md").write_text("my model")
    (export / "vae" / "notes.txt").write_text("the autoencoder")
    assert verify_manifest(export)
    assert type(qdiff.load_pipeline(export).unet).__name__ == "QuantizedUNet2DConditionModel"


def test_a_folder_without_a_manifest_loads_as_before(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "teacher")
    assert not verify_manifest(tmp_path / "teacher") and content_id(tmp_path / "teacher") is None
    loaded = qdiff.load_pipeline(tmp_path / "teacher")
    assert torch.equal(loaded.vae.decoder.conv_out.bias, pipe.vae.decoder.conv_out.bias)


def test_a_partial_export_has_no_manifest_and_a_finished_one_has(pipe, tmp_path):
    seen = []

    def check(staging):  # runs after every component is written, before the rename
        seen.append((staging / "model_index.json").is_file() and not (staging / MANIFEST_FILE).exists())
        raise ExportFormatError("check failed")

    with pytest.raises(ExportFormatError, match="check failed"):
        export_pipeline(pipe, _student(pipe), tmp_path / "export", QUANT, check=check)
    assert seen == [True] and list(tmp_path.iterdir()) == []
    out = export_pipeline(pipe, _student(pipe), tmp_path / "export", QUANT)
    assert verify_manifest(out)


def test_the_content_id_changes_with_any_listed_file(export):
    before = content_id(export)
    (export / "README.md").write_text("added later")
    assert content_id(export) == before
    path = export / VAE_WEIGHTS
    flip_bit(path, tensor_offset(path) + 1, 0)
    assert content_id(export) == before  # the manifest is a record, not a fresh hash ...
    with pytest.raises(ExportFormatError):  # ... which is why loading checks the files
        qdiff.load_pipeline(export)


@pytest.mark.parametrize("damage", ["cut", "index"])
def test_a_damaged_folder_without_a_manifest_is_one_line_naming_it(tmp_path, capsys, damage):
    """A teacher folder has no manifest to check against; diffusers' own failure to read a
    component (or a broken model_index.json) still reaches the user as one line."""
    from qdiff import sample
    from qdiff.models.loading import PipelineLoadError

    folder = tmp_path / "teacher"
    shutil.copytree(qdiff.__path__[0] + "/../assets/tiny-ldm-digits", folder)
    if damage == "cut":
        cut(folder / VAE_WEIGHTS)
    else:
        (folder / "model_index.json").write_text("{not json")
    with pytest.raises(PipelineLoadError, match=f"^{folder}"):
        qdiff.load_pipeline(folder)
    with pytest.raises(SystemExit) as stop:
        sample.main(["--pipeline", str(folder), "--out", str(tmp_path / "grid.png"), "--steps", "2"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "grid.png").exists()
