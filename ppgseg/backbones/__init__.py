"""SAM-family backbones behind one interface (`Backbone`)."""

from .base import Backbone, Features, Geometry
from .sam import LiteMedSamBackbone, SamBackbone, build_litemedsam, build_sam, build_sam_tiny
from .sam2 import Sam2Backbone, build_sam2_backbone

__all__ = [
    "Backbone",
    "Features",
    "Geometry",
    "LiteMedSamBackbone",
    "Sam2Backbone",
    "SamBackbone",
    "build_litemedsam",
    "build_sam",
    "build_sam2_backbone",
    "build_sam_tiny",
]
