"""What the MONAI Label app runs: studies and their support sets, the weights for a support set (with the on-the-fly
fine-tune), study encodings ahead of need, study similarity, segmenters, and the service that composes them."""

from .encodings import EncodingCache, StudyEncoder
from .segmenters import ImageSegmenter, VideoSegmenter
from .service import ProxyPromptService
from .studies import Study, Support
from .weights import FineTuneSettings

__all__ = [
    "EncodingCache",
    "FineTuneSettings",
    "ImageSegmenter",
    "ProxyPromptService",
    "StudyEncoder",
    "Study",
    "Support",
    "VideoSegmenter",
]
