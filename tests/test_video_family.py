"""The class-conditional Wan family: its call is the pipeline's own sampling, and the
walk's flow-matching steps follow x_t = (1 - sigma) x0 + sigma noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qdiff
from qdiff.config import ConfigError, ModelConfig, load_config
from qdiff.eval.cli import main
from qdiff.families import FAMILIES, family_for, frames_side_by_side
from qdiff.finetune import finetune
from qdiff.guidance import combine_branches
from qdiff.walk import record_calls, x0_scale
from tiny_families import tiny_class_wan

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def family():
    pipe = tiny_class_wan()
    pipe.set_progress_bar_config(disable=True)
    return family_for(pipe, ModelConfig(family="class-wan"))


def test_the_video_pipeline_is_detected_as_class_wan(family):
    assert isinstance(family_for(family.pipe), FAMILIES["class-wan"])
    assert family.num_conditions == 10 and family.denoisers == ["transformer"]


def test_the_familys_call_is_the_pipelines_own_sampling(family):
    labels = torch.tensor([3, 8])
    frames = family.pipe(class_labels=labels, guidance_scale=2.5, num_inference_steps=5,
                         output_type="pt", generator=torch.Generator().manual_seed(4)).frames
    output = family.pipe(**family.call_kwargs(labels, torch.Generator().manual_seed(4), 5, 2.5,
                                              output_type="pt"))
    images = family.to_images(output)
    assert images.shape == (2, 1, 8, 4 * 8)
    torch.testing.assert_close(images, frames_side_by_side(frames), rtol=0, atol=0)


def test_frames_side_by_side_puts_frame_f_in_column_block_f():
    videos = torch.arange(2 * 3 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 3, 1, 2, 2)  # (N, F, C, H, W)
    images = frames_side_by_side(videos)
    assert images.shape == (2, 1, 2, 3 * 2)
    for f in range(3):
        torch.testing.assert_close(images[:, :, :, 2 * f:2 * f + 2], videos[:, f])


def test_the_walk_moves_by_sigma_steps_and_weighs_x0_by_sigma(family):
    """x0 = x_t - sigma v and x_next = x_t + (sigma_next - sigma) v: each recorded call's x0
    weight is its step's sigma, and the next call's latents are this call's moved by
    (sigma_next - sigma) times the guided velocity; the walk ends on the clean sample."""
    pipe, guidance = family.pipe, 2.0
    kwargs = family.call_kwargs(torch.tensor([1, 2]), torch.Generator().manual_seed(0), 4,
                                guidance, output_type="latent")
    output, calls = record_calls(pipe, kwargs)
    sigmas = pipe.scheduler.sigmas
    assert len(calls) == 4 and float(sigmas[-1]) == 0.0
    assert [float(c.timestep.reshape(-1)[0]) for c in calls] == pipe.scheduler.timesteps.tolist()
    latents = [call.args[0].chunk(2)[0] for call in calls] + [output.frames]
    for index, call in enumerate(calls):
        assert x0_scale(pipe.scheduler, call.timestep) == pytest.approx(float(sigmas[index]))
        velocity = combine_branches(call.output.float(), guidance)
        step = float(sigmas[index + 1] - sigmas[index])
        torch.testing.assert_close(latents[index + 1], latents[index] + step * velocity,
                                   rtol=1e-5, atol=1e-6)


def test_a_stochastic_flow_walk_is_refused_with_the_fix(family):
    with pytest.raises(ConfigError, match="set distill.eta=0"):
        family.call_kwargs(torch.tensor([0]), torch.Generator().manual_seed(0), 2, 2.0, eta=1.0)


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
