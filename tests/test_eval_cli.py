"""`python -m qdiff.eval` end to end on a tiny random pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qdiff.config import load_config, save_config
from qdiff.eval import cli, sampling
from qdiff.eval.npz import load_samples, save_samples

TINY = ["--num-samples", "20", "--steps", "2", "--batch-size", "10"]


@pytest.fixture
def pipeline_dir(random_class_ldm_pipeline, tmp_path):
    random_class_ldm_pipeline.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_every_metric_against_the_teacher_writes_json_md_and_grid(pipeline_dir, tmp_path):
    out = tmp_path / "out" / "results.json"
    cli.main(["--pipeline", str(pipeline_dir), "--metric", "fid,sfid", "--metric", "is",
              "--metric", "precision,recall,accuracy", "--out", str(out), *TINY])
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"fid", "sfid", "is", "is_std", "precision", "recall",
                                      "accuracy"}
    assert all(np.isfinite(v) for v in record["results"].values())
    assert record["results"]["fid"] > 0  # other seeds: a different sample set
    assert record["settings"]["num_samples"] == 20 and record["num_evaluated"] == 20
    assert "seed 10000" in record["reference"]
    assert "| fid |" in out.with_suffix(".md").read_text()
    assert out.with_name("samples.png").is_file()


def test_interrupted_sampling_resumes_and_gives_the_same_numbers(pipeline_dir, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "out" / "results.json"
    args = ["--pipeline", str(pipeline_dir), "--metric", "fid,sfid", "--out", str(out), *TINY]
    cli.main(args)
    first = json.loads(out.read_text())["results"]
    evaluated = sorted(out.parent.glob("samples-*.npz"))
    assert len(evaluated) == 2  # the evaluated set and the teacher's reference set
    for cache in evaluated:  # as if both had crashed after their first batch
        images, labels = load_samples(cache)
        save_samples(cache, images[:10], labels[:10])

    calls = []
    original = sampling._sample_batch
    monkeypatch.setattr(sampling, "_sample_batch",
                        lambda *a: calls.append(a[-1]) or original(*a))
    cli.main(args)
    assert calls == [1, 1]  # only the second batch of each set was sampled again
    assert json.loads(out.read_text())["results"] == pytest.approx(first)


def test_samples_from_an_adm_npz_against_real_digits(pipeline_dir, tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (30, 32, 32, 1), dtype=np.uint8)
    save_samples(tmp_path / "noise.npz", images, np.arange(30) % 10)
    out = tmp_path / "npz" / "results.json"
    cli.main(["--pipeline", str(tmp_path / "noise.npz"), "--reference", "real",
              "--metric", "fid,accuracy", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert results["fid"] > 10  # noise is far from digits
    assert results["accuracy"] < 0.5


def test_no_run_and_no_pipeline_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--metric", "sfid"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "No run export found under runs/" in error
    assert "python -m qdiff.finetune configs/tiny-ldm-w4a4.yaml" in error


def test_latest_run_export_and_its_teacher_are_found(pipeline_dir, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(pipeline_dir, runs / "older" / "export")
    shutil.copytree(pipeline_dir, runs / "newer" / "export")
    save_config(load_config(None, ["model.path=/teachers/t1"]), runs / "newer" / "config.yaml")
    (runs / "newer" / "export" / "model_index.json").touch()
    latest = cli.latest_export(runs)
    assert latest == runs / "newer" / "export"
    assert str(cli.teacher_of(latest)) == "/teachers/t1"
    assert cli.teacher_of(pipeline_dir) == pipeline_dir
