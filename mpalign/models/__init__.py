"""The model: MS-Diffusion's grounding resampler and multi-subject cross-attention (the adapter), and the
MultiPersona-Align dual DINOv2 alignment that trains it (see docs/model.md)."""

from mpalign.models.adapter import MSAdapter
from mpalign.models.attention import AlignmentRecorder, MultiSubjectAttnProcessor, SelfAttnTapProcessor
from mpalign.models.resampler import GroundingResampler, fourier_box_embedding

__all__ = ["AlignmentRecorder", "GroundingResampler", "MSAdapter", "MultiSubjectAttnProcessor", "SelfAttnTapProcessor",
           "fourier_box_embedding"]
