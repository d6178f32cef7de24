"""The FID Inception-v3 architecture with random weights: layers, shapes, loading, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models.inception import InceptionA

from qdiff.eval.inception import (FID_WEIGHTS_FILE, FIDInceptionA, FIDInceptionEMaxPool,
                                  FIDInceptionV3, load_fid_inception)

STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
        "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
        "Mixed_6b", "Mixed_6c")


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_feature_shapes(inception, images):
    with torch.no_grad():
        features = inception(images)
    assert features.pool.shape == (2, 2048)
    assert features.spatial.shape == (2, 2023)  # 17 x 17 x 7
    assert features.logits.shape == (2, 1008)


def test_sfid_features_are_mixed_6d_1x1_branch_first_7_channels(inception, images):
    with torch.no_grad():
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        for name in STEM:
            x = getattr(inception.net, name)(x)
        expected = inception.net.Mixed_6d.branch1x1(x)[:, :7].flatten(1)
        torch.testing.assert_close(inception(images).spatial, expected)


def test_grey_images_are_read_as_rgb(inception):
    grey = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(inception(grey).pool, inception(grey.expand(-1, 3, -1, -1)).pool)


def test_fid_blocks_pool_like_the_tf_graph():
    torch.manual_seed(0)
    fid_block, tv_block = FIDInceptionA(16, 8).eval(), InceptionA(16, 8).eval()
    tv_block.load_state_dict(fid_block.state_dict())
    x = torch.randn(1, 16, 9, 9)
    with torch.no_grad():
        fid_out, tv_out = fid_block(x), tv_block(x)
        expected_pool = fid_block.branch_pool(
            F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    torch.testing.assert_close(fid_out[:, -8:], expected_pool)
    torch.testing.assert_close(fid_out[:, :-8], tv_out[:, :-8])  # other branches unchanged
    assert not torch.allclose(fid_out[:, -8:, 0, 0], tv_out[:, -8:, 0, 0])  # borders differ
    torch.testing.assert_close(fid_out[:, -8:, 1:-1, 1:-1], tv_out[:, -8:, 1:-1, 1:-1])

    last = FIDInceptionEMaxPool(16).eval()
    with torch.no_grad():
        torch.testing.assert_close(last(x)[:, -192:],
                                   last.branch_pool(F.max_pool2d(x, 3, 1, 1)))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_load_from_a_path(inception, tmp_path, suffix):
    state = {k: v + 1.0 if v.is_floating_point() else v
             for k, v in inception.net.state_dict().items()}
    assert state["fc.weight"].shape == (1008, 2048)  # pytorch-fid's key names and shapes
    path = tmp_path / f"weights{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    loaded = load_fid_inception(path)
    torch.testing.assert_close(loaded.net.Mixed_7c.branch_pool.conv.weight,
                               state["Mixed_7c.branch_pool.conv.weight"])


def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        load_fid_inception()
    message = str(error.value)
    assert FID_WEIGHTS_FILE in message
    assert str(tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_FILE) in message
    assert "--features PATH" in message
