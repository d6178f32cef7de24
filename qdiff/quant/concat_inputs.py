"""Where a denoiser feeds a layer a channel concatenation: the split points for `split_input`.

A diffusers UNet (`UNet2DConditionModel`, `UNet2DModel`) concatenates, before every
up-block resnet, the decoder's features with the matching encoder skip:
`resnet(cat([hidden, skip], dim=1))`. The resnet's shortcut convolution takes that
concatenation as it is. Its parts have different ranges (the skip comes from the encoder,
the decoder features from the deeper half), so one per-tensor 4-bit step size serves them
badly; eval/results/quality/step-sensitivity.md measures it as the largest late-step error.
Transformers (DiT, Wan, CogVideoX) concatenate nothing and have no entries.
"""

from __future__ import annotations

from torch import nn

SPLIT_LAYERS = ("conv_shortcut",)  # resnet layers whose input is the concatenation itself


def concat_input_splits(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{qualified layer name: (decoder channels, skip channels)} for `model`'s concatenated inputs.

    The decoder's width is followed through the up blocks: the first up block receives the
    mid block's output (`block_out_channels[-1]`), each resnet hands on its `out_channels`
    (upsamplers keep the width), and a resnet's skip is what its input adds to that.
    """
    up_blocks = getattr(model, "up_blocks", None)
    config = getattr(model, "config", None)
    if up_blocks is None or config is None or "block_out_channels" not in config:
        return {}
    hidden = config.block_out_channels[-1]
    splits: dict[str, tuple[int, int]] = {}
    for block_index, block in enumerate(up_blocks):
        for resnet_index, resnet in enumerate(getattr(block, "resnets", ())):
            skip = resnet.in_channels - hidden
            if skip > 0:
                for layer in SPLIT_LAYERS:
                    if getattr(resnet, layer, None) is not None:
                        splits[f"up_blocks.{block_index}.resnets.{resnet_index}.{layer}"] = (hidden, skip)
            hidden = resnet.out_channels
    return splits
