"""The distillation loop: it learns, it resumes exactly, it stops cleanly, it scales out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file

from qdiff.checksums import describe_files
from qdiff.config import ConfigError, load_config
from qdiff.distill import loop
from qdiff.distill.checkpoint import (_trainable_state, checkpoint_step, list_checkpoints,
                                     load_trained_student)
from qdiff.distill.ema import EMA_FILE
from qdiff.distill.loss import call_loss
from qdiff.families import family_for
from qdiff.guidance import combine_branches
from qdiff.quant import nonpositive_step_tables
from qdiff.walk import prediction, record_calls

from conftest import TINY_RUN, ctrl_c_at_training_step

TINY = [*TINY_RUN, "export.enabled=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path}", "name=run", *TINY, *overrides])


def held_out_calls(pipe, eta: float = 1.0):
    """The teacher's denoiser calls of a fixed 4-step walk that training never draws (the
    pipeline's scheduler is left set to that walk's grid)."""
    kwargs = family_for(pipe).call_kwargs(torch.arange(4), torch.Generator().manual_seed(12345),
                                          4, 2.0, eta)
    return record_calls(pipe, kwargs)[1]


@torch.no_grad()
def _held_out_loss(pipe, student, kind: str) -> float:
    """Distillation loss on a fixed trajectory that training never draws."""
    calls = held_out_calls(pipe)
    losses = [call_loss(prediction(call.ask(student)), call.output, kind, pipe.scheduler,
                        call.timestep).item() for call in calls]
    return sum(losses) / len(losses)


# the embedded recipe's objective, and EfficientDM's
@pytest.mark.parametrize("loss, walker", [("x0", "student"), ("mse", "teacher")])
def test_a_few_steps_lower_the_distillation_loss(teacher, tmp_path, loss, walker):
    cfg = _config(tmp_path, "distill.steps=24", "distill.checkpoint_every=100",
                  "quant.weight_bits=4", "quant.act_bits=4", "distill.lr=2e-3",
                  f"distill.loss={loss}", f"distill.walker={walker}")
    before = _held_out_loss(teacher, loop.build_student(teacher, cfg).model, loss)
    after = _held_out_loss(teacher, loop.distill(teacher, cfg, cfg.run_dir), loss)
    assert after < 0.9 * before


FULL_QAT = ("lora.enabled=false", "distill.base_weight_lr=1e-3")


@pytest.mark.parametrize("walker, checkpoint_every, crash_at, checkpoint, method", [
    ("teacher", 3, 5, "step-0000003", ()),  # resumes mid-trajectory: replays the teacher's path
    # checkpoints fall between trajectories; QALoRA with per-slice activation tables, each
    # table at its own rate (the resumed optimizer must take the rates from the checkpoint:
    # its fresh, uncalibrated tables would give every table the same one)
    ("student", 4, 7, "step-0000004", ("quant.split_concat_inputs=true",
                                       "distill.scale_aware_act_lr=true")),
    ("student", 4, 7, "step-0000004", FULL_QAT),  # the trained base weights are checkpointed
    # frozen weight step sizes are rebuilt, not checkpointed; the low-rank LoRA backward
    ("student", 4, 7, "step-0000004", ("distill.weight_scale_lr=0", "lora.low_rank_backward=true")),
    # the run ends with the parameters' average: the checkpoint carries it beside the live ones
    ("student", 4, 7, "step-0000004", ("distill.ema_decay=0.9",)),
    # Phi's last phase ends at step 8 (rank 2 for 4 steps, rank 1 for 4): the checkpoint there
    # holds no Phi, as the resumed student builds none
    ("student", 8, 9, "step-0000008", ("aux.enabled=true", "aux.rank=2", "aux.phase_steps=4")),
])
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
        random_class_ldm_pipeline, tmp_path, monkeypatch, walker, checkpoint_every, crash_at,
        checkpoint, method):
    pipe = random_class_ldm_pipeline
    settings = ["distill.steps=10", f"distill.checkpoint_every={checkpoint_every}",
                f"distill.walker={walker}", *method]
    steady = _config(tmp_path / "a", *settings)
    expected = _trainable_state(loop.distill(pipe, steady, steady.run_dir))

    crashing = _config(tmp_path / "b", *settings)
    with ctrl_c_at_training_step(crash_at), pytest.raises(KeyboardInterrupt):
        loop.distill(pipe, crashing, crashing.run_dir)
    assert [p.name for p in list_checkpoints(crashing.run_dir)] == [checkpoint]
    resumed = _trainable_state(loop.distill(pipe, crashing, crashing.run_dir, resume=True))
    assert resumed.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


def _trained(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in student.named_parameters() if p.requires_grad}


def test_the_run_ends_with_the_average_of_its_steps_and_checkpoints_both(
        random_class_ldm_pipeline, tmp_path, monkeypatch):
    pipe = random_class_ldm_pipeline
    cfg = _config(tmp_path, "distill.steps=4", "distill.checkpoint_every=4", "distill.ema_decay=0.5",
                  "distill.lr=1e-2")
    original, seen = loop._optimizer_step, []

    def recording(trainer):
        seen.extend([] if seen else [_trained(trainer.model)])  # the calibrated start
        result = original(trainer)
        seen.append(_trained(trainer.model))
        return result

    monkeypatch.setattr(loop, "_optimizer_step", recording)
    student = loop.distill(pipe, cfg, cfg.run_dir)
    expected = seen[0]
    for step, live in enumerate(seen[1:]):
        decay = min(0.5, (1 + step) / (10 + step))
        expected = {name: decay * expected[name] + (1 - decay) * live[name] for name in expected}
    returned = _trained(student)
    assert returned.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(returned[name], expected[name], msg=name)
    assert any(not torch.allclose(returned[name], seen[-1][name]) for name in expected)

    checkpoint = list_checkpoints(cfg.run_dir)[-1]
    for averaged, reference in ((True, returned), (False, seen[-1])):
        for name, value in _trained(loop.student_at(pipe, cfg, checkpoint, averaged)).items():
            torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)
    # an average of another student's parameters is refused by name, not by a KeyError
    foreign = tmp_path / "foreign"
    shutil.copytree(checkpoint, foreign)
    save_file({**load_file(foreign / EMA_FILE), "down_blocks.9.lora_A": torch.zeros(1)},
              foreign / EMA_FILE)
    meta = json.loads((foreign / "meta.json").read_text())  # its checksum as if written so
    meta["files"].update(describe_files(foreign, [EMA_FILE]))
    (foreign / "meta.json").write_text(json.dumps(meta))
    refusal = r"ema.safetensors does not match.*unexpected \['down_blocks.9.lora_A'\].*config changed"
    with pytest.raises(ConfigError, match=refusal):
        load_trained_student(foreign, loop.build_student(pipe, cfg, calibrated=False).model)

    without = _config(tmp_path, "distill.steps=8", "distill.checkpoint_every=4")
    with pytest.raises(ConfigError, match="written with an average.*resume with distill.ema_decay"):
        loop.distill(pipe, without, without.run_dir, resume=True)
    # the refused resume left the run's config as the run wrote it
    assert load_config(cfg.run_dir / "config.yaml").distill.ema_decay == 0.5


@torch.no_grad()
def _guided_output(pipe, student: torch.nn.Module) -> torch.Tensor:
    """The student's answer to the first call of the held-out walk."""
    return prediction(held_out_calls(pipe)[0].ask(student))


def _phi_ranks(student: torch.nn.Module) -> set[int]:
    return {m.aux.rank for m in student.modules() if getattr(m, "aux", None) is not None}


def test_the_student_at_a_checkpoint_is_the_one_that_trained_on(random_class_ldm_pipeline,
                                                                 tmp_path, monkeypatch):
    """Phi at rank 2 for steps 0-3, rank 1 for 4-7, gone from 8: each checkpoint's student,
    rebuilt from the config, answers as the run's student did when the step began."""
    pipe = random_class_ldm_pipeline
    cfg = _config(tmp_path, "distill.steps=12", "distill.checkpoint_every=4", "aux.enabled=true",
                  "aux.rank=2", "aux.phase_steps=4", "distill.lr=1e-2")
    original, outputs, ranks = loop.Trainer.start_trajectory, {}, {}

    def recording(trainer, index):  # the student as each trajectory (4 steps) begins
        outputs[trainer.step] = _guided_output(pipe, trainer.model)
        ranks[trainer.step] = _phi_ranks(trainer.model)
        return original(trainer, index)

    monkeypatch.setattr(loop.Trainer, "start_trajectory", recording)
    returned = loop.distill(pipe, cfg, cfg.run_dir)
    assert ranks[4] == {1} and ranks[8] == set()
    outputs[12] = _guided_output(pipe, returned)  # the end of the run: step 12
    ranks[12] = _phi_ranks(returned)
    for checkpoint in list_checkpoints(cfg.run_dir):
        step = checkpoint_step(checkpoint)
        rebuilt = loop.student_at(pipe, cfg, checkpoint)
        assert _phi_ranks(rebuilt) == ranks[step]
        torch.testing.assert_close(_guided_output(pipe, rebuilt), outputs[step], msg=checkpoint.name)


def test_full_qat_trains_every_base_weight_and_no_lora(random_class_ldm_pipeline, tmp_path):
    pipe = random_class_ldm_pipeline
    cfg = _config(tmp_path, "distill.steps=4", "distill.checkpoint_every=4", *FULL_QAT)
    before = loop.build_student(pipe, cfg).model.state_dict()
    student = loop.distill(pipe, cfg, cfg.run_dir)
    weights = [key for key in before if key.endswith("base_layer.weight")]
    assert weights and not any("lora" in key for key in before)
    assert all(not torch.equal(before[key], student.state_dict()[key]) for key in weights)
    assert set(weights) <= set(_trainable_state(student))  # so checkpoints carry them


def kept_and_gradients(pipe, student, call) -> tuple[int, dict[str, torch.Tensor]]:
    """One call's loss backward: bytes the forward kept for it, and the gradients."""
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.nbytes) or t,
                                                  lambda t: t):
        output = prediction(call.ask(student))
    call_loss(output, call.output, "x0", pipe.scheduler, call.timestep).backward()
    return sum(sizes), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("walker", ["student", "teacher"])
def test_the_walker_takes_each_trajectory_step(random_class_ldm_pipeline, tmp_path, monkeypatch,
                                               walker):
    """The pipeline's DDIM step (eta 0) from call k to call k + 1 takes whoever walks: the
    student's answer or the teacher's, guidance-combined as the pipeline combines them."""
    pipe = random_class_ldm_pipeline
    cfg = _config(tmp_path, "distill.steps=4", "distill.eta=0.0", "distill.checkpoint_every=4",
                  f"distill.walker={walker}")
    original, seen = loop.Trainer.on_call, []

    def record(trainer, call, student_output, teacher_output):
        seen.append((call, student_output.detach(), teacher_output))
        return original(trainer, call, student_output, teacher_output)

    monkeypatch.setattr(loop.Trainer, "on_call", record)
    loop.distill(pipe, cfg, cfg.run_dir)
    assert len(seen) == 4
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(cfg.distill.trajectory_steps)
    for (call, student_output, teacher_output), (following, _, _) in zip(seen, seen[1:]):
        latents = call.args[0].chunk(2)[0]  # the pipeline batches x_t for both branches
        for output, expected_match in ((student_output, walker == "student"),
                                       (teacher_output, walker == "teacher")):
            noise = combine_branches(output, cfg.distill.guidance_scale)
            stepped = scheduler.step(noise, call.timestep[0], latents).prev_sample
            assert torch.allclose(stepped, following.args[0].chunk(2)[0], atol=1e-6) == expected_match


def test_the_x0_loss_is_the_mse_of_the_implied_images(random_class_ldm_pipeline):
    pipe = random_class_ldm_pipeline
    calls = held_out_calls(pipe, eta=0.0)
    call = calls[0]
    student_output = call.output + 0.1 * torch.randn_like(call.output)
    alpha = pipe.scheduler.alphas_cumprod[int(call.timestep[0])]
    model_input = call.args[0]

    def image(noise):
        return (model_input - (1 - alpha).sqrt() * noise) / alpha.sqrt()

    expected = torch.nn.functional.mse_loss(image(student_output), image(call.output))
    torch.testing.assert_close(call_loss(student_output, call.output, "x0", pipe.scheduler,
                                         call.timestep), expected)
    first, last = (call_loss(c.output + 1, c.output, "x0", pipe.scheduler, c.timestep)
                   for c in (calls[0], calls[-1]))
    assert first > 100 * last  # the noisy start weighs most


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_a_call_batches_the_conditional_and_null_predictions_that_guidance_combines(
        random_class_ldm_pipeline, guidance):
    """What the student matches is the call's raw output: with guidance, the conditional
    then the null prediction, each the unguided answer to its condition."""
    pipe = random_class_ldm_pipeline
    kwargs = family_for(pipe).call_kwargs(torch.arange(2), torch.Generator().manual_seed(0), 4,
                                          guidance)
    call = record_calls(pipe, kwargs)[1][0]
    labels = [torch.arange(2), torch.full((2,), pipe.class_embedder.null_class)]
    latents = call.args[0][:2]
    with torch.no_grad():
        alone = [pipe.guided_noise(latents, call.timestep[0], pipe.class_context(label, 1.0), 1.0)
                 for label in labels]
    expected = torch.cat(alone) if guidance > 1.0 else alone[0]
    torch.testing.assert_close(call.output, expected, rtol=1e-5, atol=1e-5)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(random_class_ldm_pipeline,
                                                                     tmp_path, monkeypatch):
    cfg = _config(tmp_path, "distill.steps=8", "distill.checkpoint_every=2",
                  "distill.walker=teacher")
    original, calls = loop.call_loss, []

    def nan_at_step_five(*args):
        calls.append(1)
        loss = original(*args)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(loop, "call_loss", nan_at_step_five)
    with pytest.raises(loop.NonFiniteLossError) as error:
        loop.distill(random_class_ldm_pipeline, cfg, cfg.run_dir)
    assert "Stopped at step 4: the loss is nan at timestep " in str(error.value)
    assert "step-0000004" in str(error.value) and "lower distill.lr" in str(error.value)
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-0000002", "step-0000004"]


@pytest.mark.parametrize("scale_aware, warned", [(False, True), (True, False)])
def test_an_activation_step_size_through_zero_is_reported(random_class_ldm_pipeline, tmp_path,
                                                           caplog, scale_aware, warned):
    # act_lr 0.02 is ~4x the 8-bit time embedding's step sizes: one Adam step crosses zero;
    # with a rate per table in proportion to its steps, none does
    cfg = _config(tmp_path, "distill.steps=2", "distill.act_lr=0.02", "distill.lr=0",
                  f"distill.scale_aware_act_lr={scale_aware}",
                  *[f"quant.overrides=[{{pattern: '{p}', act_bits: 8}}]" for p in ("time_embedding.*",)])
    with caplog.at_level("WARNING", logger="qdiff.distill"):
        student = loop.distill(random_class_ldm_pipeline, cfg, cfg.run_dir)
    crossed = nonpositive_step_tables(student)
    reports = [r.getMessage() for r in caplog.records if "crossed zero" in r.getMessage()]
    assert bool(crossed) == warned and bool(reports) == warned
    # once per table, at the step it crossed (each report a later step), naming it and the fix
    assert sum(int(report.split()[2]) for report in reports) == len(crossed)
    steps = [int(report.split()[1].rstrip(":")) for report in reports]
    assert steps == sorted(set(steps)) and all(1 <= step <= 2 for step in steps)
    for report in reports:
        named = report.split("(")[1].split(")")[0].split(", ")
        assert set(named) - {"..."} <= set(crossed)
        assert "distill.scale_aware_act_lr=true" in report


def test_two_processes_train_the_same_student_as_one_with_the_whole_batch(
        random_class_ldm_pipeline, tmp_path):
    random_class_ldm_pipeline.save_pretrained(tmp_path / "pipe")
    common = [*TINY, "distill.steps=4", "distill.checkpoint_every=100", "name=run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    worker = str(Path(__file__).parent / "distill_worker.py")
    for processes, name in ((1, "one"), (2, "two")):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node", str(processes), worker,
                                 str(tmp_path / "pipe"), str(tmp_path / f"{name}.safetensors"),
                                 f"output_dir={tmp_path / name}", *common],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    moved = 0
    for key in one:
        if ".attn2.to_q." in key or ".attn2.to_k." in key:
            # the class is one context token: softmax over one key is 1 whatever q and k are,
            # so their gradients are rounding noise (zero or not by the CPU's kernels), which
            # Adam scales up to steps of up to lr: bounded, but not comparable
            assert two[key].sub(one[key]).abs().max() <= 2 * 4 * 5e-4, key
            continue
        # float sums differ with the batch split, and Adam divides by the gradients' size:
        # an entry whose gradient is tiny can move ~1e-5 apart, a tensor stays within 1e-3
        difference = two[key].sub(one[key]).norm()
        assert difference <= 1e-3 * one[key].norm() + 1e-6, (key, difference)
        moved += "lora_B" in key and one[key].abs().sum().item() > 0
    assert moved > 0  # training happened


@pytest.mark.parametrize("overrides", [[], ["distill.weight_scale_lr=0", "lora.low_rank_backward=true"]],
                         ids=["autograd", "low-rank-backward"])
def test_gradient_checkpointing_keeps_the_gradients_and_keeps_less(random_class_ldm_pipeline, tmp_path,
                                                                    overrides):
    """Recomputed blocks: the same gradients, a fraction of the tensors kept by the forward."""
    pipe, cfg = random_class_ldm_pipeline, _config(tmp_path, *overrides)
    point = held_out_calls(pipe)[0]
    kept, grads = [], []
    for checkpointing in (False, True):
        student = loop.build_student(pipe, cfg).model
        if checkpointing:
            loop.enable_gradient_checkpointing(student)
        step_kept, step_grads = kept_and_gradients(pipe, student, point)
        kept.append(step_kept)
        grads.append(step_grads)
    assert kept[1] < 0.5 * kept[0], kept
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_the_run_switches_gradient_checkpointing_on_and_refuses_a_model_without_it(
        random_class_ldm_pipeline, tmp_path):
    cfg = _config(tmp_path, "distill.steps=2", "distill.gradient_checkpointing=true")
    student = loop.distill(random_class_ldm_pipeline, cfg, cfg.run_dir)
    assert any(getattr(module, "gradient_checkpointing", False) for module in student.modules())
    with pytest.raises(ConfigError, match="gradient_checkpointing=false"):
        loop.enable_gradient_checkpointing(torch.nn.Linear(2, 2))
