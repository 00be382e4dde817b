"""The model: MS-Diffusion's grounding resampler and multi-subject cross-attention (the adapter), and the
MultiPersona-Align dual DINOv2 alignment that trains it (see docs/model.md)."""

from mpalign.models.adapter import MSAdapter
from mpalign.models.attention import (
    AlignmentRecorder,
    AutoLayout,
    MultiSubjectAttnProcessor,
    SelfAttnTapProcessor,
    TextOnlyAttnProcessor,
)
from mpalign.models.resampler import GroundingResampler, fourier_box_embedding

__all__ = ["AlignmentRecorder", "AutoLayout", "GroundingResampler", "MSAdapter", "MultiSubjectAttnProcessor",
           "SelfAttnTapProcessor", "TextOnlyAttnProcessor", "fourier_box_embedding"]
