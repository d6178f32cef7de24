"""ADM .npz sample and reference batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdiff.eval.npz import (from_uint8_nhwc, load_reference_stats, load_samples, save_samples,
                            to_uint8_nhwc)


def test_samples_round_trip_in_adm_layout(tmp_path):
    images = torch.rand(6, 3, 8, 8)
    array = to_uint8_nhwc(images)
    assert array.dtype == np.uint8 and array.shape == (6, 8, 8, 3)
    save_samples(tmp_path / "s.npz", array, np.arange(6))
    loaded, labels = load_samples(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded, array)
    np.testing.assert_array_equal(labels, np.arange(6))
    torch.testing.assert_close(from_uint8_nhwc(loaded), images, atol=0.5 / 255 + 1e-6, rtol=0)
    with np.load(tmp_path / "s.npz") as raw:  # the keys ADM's evaluator reads
        assert sorted(raw.keys()) == ["arr_0", "arr_1"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_reference_batch_statistics_round_trip(tmp_path):
    stats = {"mu": np.zeros(4), "sigma": np.eye(4), "mu_s": np.ones(2), "sigma_s": np.eye(2)}
    save_samples(tmp_path / "ref.npz", np.zeros((2, 4, 4, 3), np.uint8), None, **stats)
    loaded = load_reference_stats(tmp_path / "ref.npz")
    for key, value in stats.items():
        np.testing.assert_array_equal(loaded[key], value)
    save_samples(tmp_path / "plain.npz", np.zeros((2, 4, 4, 3), np.uint8))
    assert load_reference_stats(tmp_path / "plain.npz") is None
    assert load_samples(tmp_path / "plain.npz")[1] is None


def test_bad_files_are_refused_with_the_reason(tmp_path):
    np.savez(tmp_path / "wrong.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        load_samples(tmp_path / "wrong.npz")
    np.savez(tmp_path / "half.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8), mu=np.zeros(2))
    with pytest.raises(ValueError, match="needs all of"):
        load_reference_stats(tmp_path / "half.npz")
    np.savez(tmp_path / "objects.npz", arr_0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_samples(tmp_path / "objects.npz")
    with pytest.raises(ValueError, match="uint8"):
        from_uint8_nhwc(np.zeros((1, 2, 2, 3), np.float32))
