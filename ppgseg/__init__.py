"""ppgseg: few-shot medical segmentation with a Proxy Prompt Generator on frozen SAM-family models."""

from .build import BACKBONES, PRESETS, Preset, build_model
from .checkpoint import load_ppg, save_ppg
from .modeling.generator import SupportEmbedding
from .modeling.proxy_sam import ProxyPromptSAM

__all__ = [
    "BACKBONES",
    "PRESETS",
    "Preset",
    "ProxyPromptSAM",
    "SupportEmbedding",
    "build_model",
    "load_ppg",
    "save_ppg",
]
__version__ = "0.1.0"
