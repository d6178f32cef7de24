"""LTX-2 (`LTX2Pipeline`: audio and video from one transformer, Gemma-3 text encoder).

Each denoising step calls the transformer for classifier-free guidance (batched),
spatio-temporal guidance and modality isolation: one optimizer step over those calls. The
student is trained on the video prediction, the first output; the audio head is quantized
and calibrated but keeps the teacher's answer while distilling.
"""

from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("ltx2")
class LTX2(Family):
    pipelines = ("LTX2Pipeline",)
    video = True
    # video and audio input projections, caption projections, the timestep embedders of both
    # modalities and of their cross attention, the output projections
    eight_bit_layers = ("proj_in", "audio_proj_in", "caption_projection.*",
                        "audio_caption_projection.*", "time_embed.*", "audio_time_embed.*",
                        "av_cross_attn_*", "proj_out", "audio_proj_out")
    default_steps, default_guidance = 40, 4.0
