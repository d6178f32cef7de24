"""The class-conditional Wan family: its flow-matching walk is the pipeline's own sampling,
and its loss weights follow x_t = (1 - sigma) x0 + sigma noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qdiff
from qdiff.config import ConfigError, ModelConfig, load_config
from qdiff.distill.trajectory import teacher_trajectory
from qdiff.families import ClassWanFamily, family_for
from qdiff.families.class_wan import frames_side_by_side
from qdiff.eval.cli import main
from qdiff.finetune import finetune
from tiny_families import tiny_class_wan

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def family():
    pipe = tiny_class_wan()
    pipe.set_progress_bar_config(disable=True)
    return family_for(pipe, ModelConfig(family="class-wan"))


def test_the_video_pipeline_is_detected_as_class_wan(family):
    assert isinstance(family_for(family.pipe), ClassWanFamily)
    assert family.num_conditions == 10 and family.denoiser_name == "transformer"


def test_adapter_sampling_is_the_pipelines_own_sampling(family):
    labels = torch.tensor([3, 8])
    frames = family.pipe(class_labels=labels, guidance_scale=2.5, num_inference_steps=5,
                         output_type="pt", generator=torch.Generator().manual_seed(4)).frames
    images = family.sample_images(family.denoiser, labels, 2.5, 5, torch.Generator().manual_seed(4))
    expected = frames_side_by_side(frames.transpose(1, 2))  # (N, F, C, H, W) -> (N, C, F, H, W)
    assert images.shape == (2, 1, 8, 4 * 8)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def test_frames_side_by_side_puts_frame_f_in_column_block_f():
    videos = torch.arange(2 * 1 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 1, 3, 2, 2)
    images = frames_side_by_side(videos)
    for f in range(3):
        torch.testing.assert_close(images[:, :, :, 2 * f:2 * f + 2], videos[:, :, f])


def test_flow_scales_move_the_clean_sample_and_the_next_latent_by_hand(family):
    """x0 = x_t - sigma v and x_next = x_t + (sigma_next - sigma) v: perturbing v by d moves
    them by sigma d and (sigma_next - sigma) d."""
    sampler = family.trajectory_sampler(4)
    sigmas = sampler.sigmas
    points = list(teacher_trajectory(family, torch.tensor([1, 2]), 4, 0.0, 2.0,
                                     torch.Generator().manual_seed(0)))
    assert [p.timestep for p in points] == list(sampler.timesteps)
    for index, point in enumerate(points):
        assert point.x0_scale == pytest.approx(float(sigmas[index]))
        assert point.update_scale == pytest.approx(float(sigmas[index + 1] - sigmas[index]))
        latents = torch.randn(2, 1, 4, 8, 8)
        velocity, bump = torch.randn_like(latents), 0.1 * torch.randn_like(latents)
        moved = sampler.step(velocity + bump, point.timestep, latents, 0.0, None)
        still = sampler.step(velocity, point.timestep, latents, 0.0, None)
        torch.testing.assert_close(moved - still, point.update_scale * bump, rtol=1e-4, atol=1e-6)
    assert float(sigmas[-1]) == 0.0  # the walk ends on the clean sample


def test_a_stochastic_flow_walk_is_refused_with_the_fix(family):
    sampler = family.trajectory_sampler(2)
    latents = torch.zeros(1, 1, 4, 8, 8)
    with pytest.raises(ConfigError, match="set distill.eta=0"):
        sampler.step(latents, sampler.timesteps[0], latents, 1.0, None)


def test_the_video_recipe_decays_phi_away_and_exports_a_plain_low_bit_transformer(family, tmp_path):
    teacher = tmp_path / "teacher"
    family.pipe.save_pretrained(teacher)
    cfg = load_config(REPO / "configs" / "tiny-wan-w4a4.yaml", [
        f"model.path={teacher}", f"output_dir={tmp_path}", "name=run", "aux.rank=4",
        "aux.phase_steps=2", "distill.steps=12", "distill.trajectory_steps=4",
        "distill.batch_size=2", "quant.calibration_samples=2", "lora.rank=4",
        "distill.checkpoint_every=12", "distill.sample_every=1000", "distill.log_every=1"])
    assert cfg.aux.enabled  # the recipe's own Phi
    run_dir = finetune(cfg)
    ranks = [json.loads(line)["aux_rank"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert ranks[0] == 4 and ranks[-1] == 0 and ranks == sorted(ranks, reverse=True)
    index = json.loads((run_dir / "export" / "model_index.json").read_text())
    assert index["transformer"] == ["qdiff.export.models", "QuantizedWanTransformer3DModel"]
    exported = qdiff.load_pipeline(run_dir / "export")
    keys = list(exported.transformer.state_dict())
    assert keys and not [key for key in keys if "aux" in key or "lora" in key]
    layers = exported.transformer.config["quantization_config"]["layers"]
    assert {spec["weight_bits"] for name, spec in layers.items() if name.startswith("blocks.")} == {4}


def test_eval_cli_scores_a_video_pipeline_against_itself_as_a_perfect_pair(family, tmp_path):
    teacher = tmp_path / "teacher"
    family.pipe.save_pretrained(teacher)
    out = tmp_path / "eval" / "results.json"
    main(["--pipeline", str(teacher), "--reference", "teacher", "--num-samples", "10",
          "--steps", "2", "--batch-size", "5", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"frame_accuracy", "consecutive_similarity", "mean_speed", "frame_fid",
                            "motion_error", "frame_fid_real"}
    assert results["motion_error"] == 0.0 and abs(results["frame_fid"]) < 1e-2
    assert results["frame_fid_real"] > 1.0  # random weights are far from moving digits
    assert (out.parent / "samples.png").is_file() and out.with_suffix(".md").is_file()
    with pytest.raises(SystemExit):  # an ADM reference batch has no videos to pair with
        main(["--pipeline", str(teacher), "--reference", str(tmp_path / "ref.npz"), "--out", str(out)])
