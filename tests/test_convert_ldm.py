"""The LDM converter on a synthetic checkpoint with latent-diffusion's key layout.

tests/ldm_checkpoint.py writes the original layout itself, module by module as
openaimodel's UNetModel, taming's VQModel and the ClassEmbedder build it (tiny sizes,
random values) -- not with the converter's table; this file checks that every key is consumed, every parameter
filled with the right tensor, and that the reverse mapping gives the checkpoint back.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import qdiff
from ldm_checkpoint import CLASSES, OPTIONS, synthetic_checkpoint
from qdiff.convert import ConversionError, convert, read_checkpoint, to_original
from qdiff.convert.__main__ import main as convert_main
from qdiff.convert.ldm import pipeline_state
from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint():
    return synthetic_checkpoint()


@pytest.fixture(scope="module")
def converted(checkpoint):
    return convert(checkpoint, OPTIONS)


def test_every_key_is_consumed_and_every_parameter_filled(checkpoint, converted):
    state = pipeline_state(converted)
    weights = {k: v for k, v in checkpoint.items() if not k.startswith(("betas", "alphas", "sqrt", "log",
                                                                      "posterior"))}
    assert sum(v.numel() for v in state.values()) == sum(v.numel() for v in weights.values())
    assert len(state) == len(weights)
    pairs = {  # a few keys by hand, independent of the converter's table
        "unet.conv_in.weight": "model.diffusion_model.input_blocks.0.0.weight",
        "unet.time_embedding.linear_2.bias": "model.diffusion_model.time_embed.2.bias",
        "unet.down_blocks.1.resnets.0.conv_shortcut.weight": "model.diffusion_model.input_blocks.3.0.skip_connection.weight",
        "unet.down_blocks.0.downsamplers.0.conv.weight": "model.diffusion_model.input_blocks.2.0.op.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "unet.mid_block.resnets.1.time_emb_proj.weight": "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "unet.up_blocks.0.attentions.1.proj_out.weight": "model.diffusion_model.output_blocks.1.1.proj_out.weight",
        "unet.up_blocks.0.upsamplers.0.conv.weight": "model.diffusion_model.output_blocks.1.2.conv.weight",
        "unet.up_blocks.1.resnets.1.conv2.weight": "model.diffusion_model.output_blocks.3.0.out_layers.3.weight",
        "unet.conv_norm_out.weight": "model.diffusion_model.out.0.weight",
        "vae.decoder.up_blocks.0.resnets.1.conv1.weight": "first_stage_model.decoder.up.1.block.1.conv1.weight",
        "vae.decoder.up_blocks.1.resnets.0.norm2.bias": "first_stage_model.decoder.up.0.block.0.norm2.bias",
        "vae.decoder.up_blocks.0.upsamplers.0.conv.bias": "first_stage_model.decoder.up.1.upsample.conv.bias",
        "vae.encoder.down_blocks.1.resnets.0.conv_shortcut.weight":
            "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "vae.quantize.embedding.weight": "first_stage_model.quantize.embedding.weight",
        "class_embedder.embedding.weight": "cond_stage_model.embedding.weight",
    }
    for new, old in pairs.items():
        assert torch.equal(state[new], checkpoint[old]), new
    attention = "first_stage_model.encoder.mid.attn_1.q.weight"
    assert torch.equal(state["vae.encoder.mid_block.attentions.0.to_q.weight"], checkpoint[attention][:, :, 0, 0])
    assert converted.class_embedder.null_class == CLASSES
    assert converted.scheduler.config.beta_schedule == "scaled_linear"
    assert converted.scheduler.config.beta_start == 0.0015 and converted.scheduler.config.beta_end == 0.0195


def test_the_reverse_mapping_gives_the_checkpoint_back(checkpoint, converted):
    back = to_original(converted)
    assert back.keys() == checkpoint.keys()
    for key, value in checkpoint.items():
        if key in ("betas",) or not key.startswith(("alphas", "sqrt", "log", "posterior")):
            torch.testing.assert_close(back[key], value, rtol=0 if key != "betas" else 1e-6, atol=0, msg=key)
        else:
            torch.testing.assert_close(back[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_an_unknown_key_or_a_wrong_shape_fails_and_names_it(checkpoint):
    extra = {**checkpoint, "model.diffusion_model.label_emb.weight": torch.zeros(10, 128)}
    with pytest.raises(ConversionError, match=r"1 keys no rule maps: model.diffusion_model.label_emb.weight"):
        convert(extra, OPTIONS)
    key = "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight"
    wrong = {**checkpoint, key: torch.zeros(64, 128)}
    with pytest.raises(ConversionError, match=r"shapes differ: unet.down_blocks.0.resnets.0.time_emb_proj.weight "
                                              r"\(checkpoint \(64, 128\), model \(32, 128\)\)"):
        convert(wrong, OPTIONS)
    missing = {k: v for k, v in checkpoint.items() if k != "first_stage_model.quant_conv.bias"}
    with pytest.raises(ConversionError, match="1 parameters not filled: vae.quant_conv.bias"):
        convert(missing, OPTIONS)


def test_the_cli_reads_a_ckpt_safely_and_writes_a_loadable_pipeline(checkpoint, tmp_path):
    torch.save({"state_dict": checkpoint, "global_step": 7}, tmp_path / "cin.ckpt")
    convert_main(["ldm", str(tmp_path / "cin.ckpt"), str(tmp_path / "ldm4"), "--latent-size", "8"])
    pipe = qdiff.load_pipeline(tmp_path / "ldm4")
    assert type(pipe).__name__ == "ClassConditionalLDMPipeline"
    assert sorted(p.name for p in (tmp_path / "ldm4" / "unet").iterdir()) == \
        ["config.json", "diffusion_pytorch_model.safetensors"]
    images = pipe(class_labels=[1, 9], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    torch.save({"state_dict": checkpoint, "callback": torch.nn.Identity()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ConversionError, match="does not unpickle.*save_file"):
        read_checkpoint(tmp_path / "pickled.ckpt")


def test_the_cli_refuses_a_folder_that_holds_files_and_leaves_it_as_it_was(checkpoint, tmp_path,
                                                                          capsys):
    save_file(checkpoint, tmp_path / "cin.safetensors")
    (tmp_path / "ldm4").mkdir()
    (tmp_path / "ldm4" / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:
        convert_main(["ldm", str(tmp_path / "cin.safetensors"), str(tmp_path / "ldm4")])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (f"error: out {tmp_path / 'ldm4'} exists and is not empty; "
                                       f"remove it first or give a new folder (nothing was "
                                       f"written).\n")
    assert [p.name for p in (tmp_path / "ldm4").iterdir()] == ["model_index.json"]
    assert (tmp_path / "ldm4" / "model_index.json").read_text() == "{}"


def test_a_save_that_fails_leaves_no_half_written_folder(checkpoint, tmp_path, capsys, monkeypatch):
    save_file(checkpoint, tmp_path / "cin.safetensors")

    def disk_full(self, folder, **kwargs):
        (Path(folder) / "unet").mkdir()
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "unet"))

    monkeypatch.setattr(ClassConditionalLDMPipeline, "save_pretrained", disk_full)
    with pytest.raises(SystemExit) as stop:
        convert_main(["ldm", str(tmp_path / "cin.safetensors"), str(tmp_path / "ldm4"),
                      "--latent-size", "8"])
    assert stop.value.code == 2
    assert "the disk is full; free some space" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cin.safetensors"]


def test_the_cli_writes_into_an_empty_folder_and_leaves_nothing_beside_it(checkpoint, tmp_path):
    save_file(checkpoint, tmp_path / "cin.safetensors")
    (tmp_path / "ldm4").mkdir()
    convert_main(["ldm", str(tmp_path / "cin.safetensors"), str(tmp_path / "ldm4"),
                  "--latent-size", "8", "--debug"])
    assert (tmp_path / "ldm4" / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cin.safetensors", "ldm4"]
