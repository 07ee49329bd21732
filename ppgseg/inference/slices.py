"""2D images and volumes as slices: a label map from a support embedding, decoded slice by slice (every slice, or
sparsely from encoder features computed earlier), and the encoder features of a volume's slices."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from torch import Tensor

from ..backbones.base import Features
from ..data.intensity import to_byte_range
from ..lora import merged_lora
from ..modeling.generator import SupportEmbedding
from ..modeling.proxy_sam import ProxyPromptSAM
from .policy import EVERY_SLICE, DecodePolicy
from .sparse import sparse_slice_logits


def segment_image(
    model: ProxyPromptSAM,
    image: Tensor,
    embedding: SupportEmbedding,
    label_ids: Sequence[int],
    *,
    axis: int = 2,
    policy: DecodePolicy = EVERY_SLICE,
    skip: Sequence[int] = (),
    inferer: Inferer | None = None,
    features: Features | None = None,
) -> Tensor:
    """Label map (spatial shape of ``image``, uint8 label ids) of a 2D image or a 3D volume (C, *spatial) as read.

    2D images are segmented in file orientation (readers give (W, H)), as training sees them; volumes slice by slice
    along ``axis``, the support encoded once. Slices in ``skip`` are left 0 (the caller fills them). ``inferer``,
    ``policy``: see `label_slices`. ``features``: the encoder's features of every slice of a volume
    (`encode_slices`), computed earlier; then only the PPG and the decoder run. A 2D image is one slice: its policy's
    ``z_stride`` does not apply."""
    spatial = image.shape[1:]
    if len(spatial) == 2:
        one = label_slices(model, as_slices(image, axis), embedding, label_ids, policy=policy.dense(), inferer=inferer)
        return one[0].T
    if len(spatial) != 3:
        raise ValueError(f"expected a 2D image or a 3D volume, got spatial shape {tuple(spatial)}")
    if not 0 <= axis <= 2:
        raise ValueError(f"axis must be 0, 1 or 2 for a volume, got {axis}")
    slices = as_slices(image, axis)  # (Z, C, a, b)
    if features is not None and features.embed.shape[0] != len(slices):
        raise ValueError(f"features of {features.embed.shape[0]} slices for a volume of {len(slices)} slices")
    todo = [z for z in range(len(slices)) if z not in set(skip)]
    out = torch.zeros((len(slices), *slices.shape[2:]), dtype=torch.uint8)
    if todo:
        out[todo] = label_slices(
            model, slices[todo], embedding, label_ids, policy=policy, inferer=inferer, positions=todo,
            features=None if features is None else features.select(todo),
        )  # fmt: skip
    return out.movedim(0, axis)


def label_slices(
    model: ProxyPromptSAM,
    slices: Tensor,
    embedding: SupportEmbedding,
    label_ids: Sequence[int],
    *,
    policy: DecodePolicy = EVERY_SLICE,
    inferer: Inferer | None = None,
    features: Features | None = None,
    positions: Sequence[int] | None = None,
) -> Tensor:
    """(Z, C, H, W) -> (Z, H, W) label map (`to_label`). ``inferer`` runs the model (MONAI's `SimpleInferer` by
    default; `NativeTileInferer` for native-resolution tiles). ``features``: the slices' encoder features, computed
    earlier (one pass only). ``policy``: how masks are decoded; a sparse one (``z_stride`` > 1) needs ``features``
    and decodes the slices as `sparse_slice_logits` does (``positions``: the slices' indices in the volume). LoRA
    adapters are merged while it runs (`merged_lora`)."""
    if features is not None and inferer is not None:
        raise ValueError("features computed earlier serve one pass over each slice, not an inferer's tiles")
    if policy.sparse and features is None:
        raise ValueError("z_stride > 1 needs the slices' encoder features computed earlier (features=...)")
    inferer = inferer or SimpleInferer()
    geo = model.backbone.geometry(tuple(slices.shape[-2:]))
    device, chunk = model.backbone.device, policy.chunk
    options = {"min_carried": policy.min_carried, "box_refine": policy.box_refine}
    out = []
    with torch.no_grad(), merged_lora(model):
        if policy.sparse:
            low = sparse_slice_logits(model, features, embedding, policy, positions=positions)
        for start in range(0, len(slices), chunk):
            if policy.sparse:
                logits = model.backbone.postprocess(low[start : start + chunk].to(device), geo)
            elif features is None:
                part = torch.stack([to_byte_range(s) for s in slices[start : start + chunk]])
                logits = inferer(part, lambda x: model.segment(x, embedding, **options))
            else:
                f = features.select(slice(start, start + chunk)).to(device)
                logits = model.backbone.postprocess(model.segment_features(f, embedding, **options), geo)
            out.append(to_label(logits.cpu(), label_ids))  # (z, N, H, W) logits
    return torch.cat(out)


def encode_slices(model: ProxyPromptSAM, image: Tensor, axis: int, lock=None) -> Features:
    """The encoder's features of every slice of a volume (C, *spatial) along ``axis``, as `segment_image` would
    compute them, on the CPU. ``lock`` (e.g. a service's) is held for each slice only, so others can use the model in
    between."""
    parts = []
    for s in as_slices(image, axis):
        x, _ = model.backbone.preprocess(to_byte_range(s)[None])
        with lock or contextlib.nullcontext():
            f = model.encode_images(x)
        parts.append(f.to("cpu"))
    return Features.cat(parts)


def as_slices(image: Tensor, axis: int) -> Tensor:
    """(C, *spatial) as read -> (Z, C, H, W) slices along ``axis``; a 2D image is one slice in file orientation
    (readers give (W, H))."""
    data = image.as_tensor() if isinstance(image, MetaTensor) else image
    if data.dim() == 3:
        return data.transpose(-1, -2)[None]
    return data.movedim(axis + 1, 0)


def to_label(logits: Tensor, label_ids: Sequence[int]) -> Tensor:
    """(Z, N, H, W) logits -> (Z, H, W) uint8 label map: at each pixel the label id of the most confident object with
    a positive logit, 0 where none is."""
    ids = torch.tensor([0, *label_ids], dtype=torch.uint8)
    best = logits.max(dim=1)
    return ids[torch.where(best.values > 0, best.indices + 1, 0)]
