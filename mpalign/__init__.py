"""mpalign: MS-Diffusion's multi-subject adapter with MultiPersona-Align's dual DINOv2 alignment, on Ray."""

__version__ = "0.1.0"
