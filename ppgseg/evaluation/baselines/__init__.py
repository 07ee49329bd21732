"""PPG's peers in one harness: the same backbone, preprocessing, data and metrics (see `protocol`)."""

from __future__ import annotations

from .base import Method, Pairs, Target
from .finetune import DecoderFineTune
from .medpersam import MedPerSAM
from .persam import PerSAM
from .ppg import ProxyPrompt
from .prompted import BoxPrompt, OnePoint

# name on the command line -> the method's class; "ppg" and "ppg_box" (the same model with `refine_with_box`) are
# built from the protocol's trained model
BASELINES: dict[str, type[Method]] = {
    "box": BoxPrompt,
    "point": OnePoint,
    "persam": PerSAM,
    "medpersam": MedPerSAM,
    "finetune": DecoderFineTune,
}
PPG_METHODS = ("ppg", "ppg_box")
METHODS = (*PPG_METHODS, *BASELINES)

__all__ = [
    "BASELINES", "METHODS", "PPG_METHODS", "BoxPrompt", "DecoderFineTune", "MedPerSAM", "Method", "OnePoint", "Pairs",
    "PerSAM", "ProxyPrompt", "Target",
]  # fmt: skip
