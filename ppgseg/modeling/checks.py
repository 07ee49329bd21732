"""Checks of what a model is given: a support set, and masks brought into the encoder's frame."""

from __future__ import annotations

import torch
from torch import Tensor


def check_support(images: Tensor, masks: Tensor) -> None:
    """Raise ValueError naming what is wrong with a support set."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"support images must be (K, 1 or 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("the support set is empty (K = 0): give at least one image-mask pair")
    if masks.dim() != 4:
        raise ValueError(f"support masks must be (K, N, H, W), got shape {tuple(masks.shape)}")
    if masks.shape[0] != images.shape[0]:
        raise ValueError(f"{masks.shape[0]} support masks for {images.shape[0]} support images (K must match)")
    if masks.shape[1] == 0:
        raise ValueError("support masks have no object (N = 0)")
    if masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"support mask {tuple(masks.shape[-2:])} does not match image {tuple(images.shape[-2:])}")
    if masks.dtype != torch.bool and not bool(((masks == 0) | (masks == 1)).all()):
        raise ValueError(f"support masks must be binary (0/1); found values {masks.unique()[:8].tolist()}")
    empty = [n for n in range(masks.shape[1]) if not bool(masks[:, n].any())]
    if empty:
        raise ValueError(f"support object(s) {empty} are empty in every support pair: nothing shows what to segment")


def check_in_frame(raw: Tensor, framed: Tensor, what: str, size: tuple[int, int] | None = None) -> None:
    """Raise ValueError if an object drawn in ``raw`` (N, H0, W0) is empty in ``framed`` (N, S, S), the masks brought
    to the model's frame: the model would be asked to follow (or learn) a mask that is not there."""
    lost = [n for n in range(raw.shape[0]) if bool(raw[n].any()) and not bool(framed[n].any())]
    if lost:
        at = f" at the encoder's {size[0]}x{size[1]}" if size else " in the encoder's frame"
        raise ValueError(
            f"{what}: object(s) {lost} drawn in the {tuple(raw.shape[-2:])} mask vanish{at} (too thin or small "
            f"for the resize); use tiles at native resolution or draw the object larger"
        )
