"""`python -m qdiff.sample` writes a grid with one row per class."""

from __future__ import annotations

from PIL import Image

from qdiff import sample


def test_sample_writes_a_grid_of_the_requested_shape(random_class_ldm_pipeline, tmp_path):
    random_class_ldm_pipeline.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    sample.main(["--pipeline", str(tmp_path / "pipe"), "--classes", "3,5", "--per-class", "4",
                 "--steps", "2", "--out", str(out)])
    width, height = Image.open(out).size
    # torchvision's grid: 1-pixel padding around and between 32x32 tiles
    assert (width, height) == (4 * 33 + 1, 2 * 33 + 1)
