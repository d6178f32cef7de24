"""The evaluation's sample cache is keyed on what the model holds and the settings: a model
retrained into the same folder samples afresh, and a damaged cache is sampled again."""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

import qdiff
from qdiff.config import LoRAConfig, QuantConfig
from qdiff.eval import cli, sampling
from qdiff.eval.npz import load_samples, save_samples
from qdiff.eval.sampling import SamplingSettings, generate, model_content_id, settings_for
from qdiff.export import export_pipeline
from qdiff.families import family_for
from qdiff.quant import calibrating, quantize_, set_timesteps

from conftest import micro_class_ldm_pipeline

SETTINGS = SamplingSettings(num_samples=4, steps=2, guidance=2.0, seed=0, batch_size=2)

pytestmark = pytest.mark.usefixtures("one_thread", "quiet")


@pytest.fixture(scope="module")
def pipe():
    return micro_class_ldm_pipeline()


def _export(pipe, folder, seed: int):
    """An export of a student whose activation ranges come from calibration seed `seed`:
    what a retrain with --overwrite writes into the same folder."""
    student = copy.deepcopy(pipe.unet)
    quantize_(student, QuantConfig(weight_bits=4, act_bits=4), LoRAConfig(rank=2))
    set_timesteps(student, [900.0, 100.0])
    torch.manual_seed(seed)
    with torch.no_grad(), calibrating(student):
        for t in (900.0, 100.0):
            student(torch.randn(2, 4, 8, 8) * (1 + seed), t, encoder_hidden_states=torch.randn(2, 1, 16))
    return export_pipeline(pipe, student, folder, QuantConfig(weight_bits=4, act_bits=4))


def _fresh(folder, settings=SETTINGS) -> np.ndarray:
    return generate(qdiff.load_pipeline(folder), settings)[0]


def test_a_model_retrained_into_the_same_folder_is_sampled_again(pipe, tmp_path, caplog):
    export, out = tmp_path / "run" / "export", tmp_path / "eval"
    first = cli._samples_of(_export(pipe, export, seed=0), SETTINGS, out)[0]
    _export(pipe, export, seed=1)  # --overwrite: the same path, another model
    with caplog.at_level(logging.INFO, logger="qdiff.eval"):
        second = cli._samples_of(export, SETTINGS, out)[0]
    assert not any("reusing" in message for message in caplog.messages)
    assert len(list(out.glob("samples-*.npz"))) == 2  # a different key, a different cache
    np.testing.assert_array_equal(second, _fresh(export))
    assert not np.array_equal(second, first)
    # and the same model again reuses its samples, saying which cache
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qdiff.eval"):
        again = cli._samples_of(export, SETTINGS, out)[0]
    family = family_for(qdiff.load_pipeline(export))
    key = settings_for(family, SETTINGS).cache_key(model_content_id(export))
    assert caplog.messages == [f"sample cache {out / f'samples-{key}.npz'}: reusing 4 samples"]
    np.testing.assert_array_equal(again, second)


def test_a_folder_without_a_manifest_is_keyed_on_its_files(pipe, tmp_path):
    folder = tmp_path / "teacher"
    pipe.save_pretrained(folder)
    before = model_content_id(folder)
    assert before.startswith("files:") and model_content_id(folder) == before
    (folder / "vae" / "config.json").write_text((folder / "vae" / "config.json").read_text() + " ")
    assert model_content_id(folder) != before
    assert model_content_id(_export(pipe, tmp_path / "export", 0)).startswith("manifest:")


def test_the_key_covers_the_settings_the_content_and_the_qdiff_version(monkeypatch):
    key = SETTINGS.cache_key("manifest:abc")
    others = [replace(SETTINGS, **change).cache_key("manifest:abc") for change in
              ({"steps": 3}, {"guidance": 2.5}, {"seed": 1}, {"batch_size": 4},
               {"num_classes": 5}, {"num_samples": 5})]
    assert key not in others and len(set(others)) == len(others)
    assert SETTINGS.cache_key("manifest:abd") != key
    # full batches: a larger number of samples extends the same cache
    assert replace(SETTINGS, num_samples=8).cache_key("manifest:abc") == key
    monkeypatch.setattr(qdiff, "__version__", "99.0")
    assert SETTINGS.cache_key("manifest:abc") != key


def test_more_samples_extend_the_cache_with_the_images_a_fresh_run_draws(pipe, tmp_path, monkeypatch):
    export = _export(pipe, tmp_path / "export", seed=0)
    cli._samples_of(export, SETTINGS, tmp_path / "eval")
    calls = []
    original = sampling._sample_batch
    monkeypatch.setattr(sampling, "_sample_batch", lambda *a: calls.append(a[-1]) or original(*a))
    more = replace(SETTINGS, num_samples=8)  # two more full batches
    images = cli._samples_of(export, more, tmp_path / "eval")[0]
    assert calls == [2, 3]
    np.testing.assert_array_equal(images, _fresh(export, more))
    calls.clear()  # a partial last batch is drawn smaller: 7 samples have a cache of their own
    ragged = cli._samples_of(export, replace(SETTINGS, num_samples=7), tmp_path / "eval")[0]
    assert calls == [0, 1, 2, 3] and len(list((tmp_path / "eval").glob("samples-*.npz"))) == 2
    np.testing.assert_array_equal(ragged, _fresh(export, replace(SETTINGS, num_samples=7)))


@pytest.mark.parametrize("damage, reason", [
    (lambda path: path.write_bytes(path.read_bytes()[:100]), "File is not a zip file"),
    (lambda path: save_samples(path, np.zeros((4, 8, 8, 3), np.float32), np.arange(4) % 10),
     "arr_0 is float32 (4, 8, 8, 3), not uint8 (N, H, W, C) with N >= 1"),
    (lambda path: save_samples(path, load_samples(path)[0], np.zeros(4)),
     "labels are not the balanced classes"),
], ids=["cut", "float images", "wrong labels"])
def test_a_damaged_cache_is_discarded_and_sampled_again(pipe, tmp_path, caplog, damage, reason):
    export = _export(pipe, tmp_path / "export", seed=0)
    cli._samples_of(export, SETTINGS, tmp_path / "eval")
    cache = next((tmp_path / "eval").glob("samples-*.npz"))
    damage(cache)
    with caplog.at_level(logging.INFO, logger="qdiff.eval"):
        images = cli._samples_of(export, SETTINGS, tmp_path / "eval")[0]
    assert (f"{cache}: damaged sample cache ({reason}); discarding it and sampling again"
            in caplog.messages)
    np.testing.assert_array_equal(images, _fresh(export))
    np.testing.assert_array_equal(load_samples(cache)[0], images)


def test_an_export_damaged_after_sampling_is_refused_not_served_from_the_cache(pipe, tmp_path):
    export = _export(pipe, tmp_path / "export", seed=0)
    cli._samples_of(export, SETTINGS, tmp_path / "eval")
    vae = export / "vae" / "diffusion_pytorch_model.safetensors"
    vae.write_bytes(vae.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(qdiff.export.ExportFormatError, match="vae/diffusion_pytorch_model.safetensors"):
        cli._samples_of(export, SETTINGS, tmp_path / "eval")
    shutil.rmtree(export)
