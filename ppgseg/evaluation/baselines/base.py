"""What every method in the comparison sees: the support pairs and the targets in the backbone's frame, and one
interface (`Method`) so that PPG and its peers run through the same loop, data and metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...backbones.base import Backbone, Features, Geometry, encoder_frame
from ...data.contract import Sample
from ...data.intensity import to_byte_range

EMPTY_LOGIT = -20.0  # logits of a prediction that is empty everywhere


@dataclass
class Pairs:
    """Labelled images in the encoder's frame: x (K, 3, S, S), masks (K, N, S, S) one channel per object, and the
    frozen encoder's features of x (batch K)."""

    x: Tensor
    masks: Tensor
    features: Features

    @classmethod
    def encode(cls, backbone: Backbone, samples: Sequence[Sample], label_ids: Sequence[int]) -> Pairs:
        frames = [encoder_frame(backbone, to_byte_range(s.image), s.masks(list(label_ids))) for s in samples]
        x = torch.cat([f[0] for f in frames])
        return cls(x, torch.cat([f[1] for f in frames]), encode_each(backbone, x))

    @staticmethod
    def cat(parts: Sequence[Pairs]) -> Pairs:
        return Pairs(
            torch.cat([p.x for p in parts]),
            torch.cat([p.masks for p in parts]),
            Features.cat([p.features for p in parts]),
        )

    def select(self, index: Sequence[int]) -> Pairs:
        index = list(index)
        return Pairs(self.x[index], self.masks[index], self.features.select(index))

    def __len__(self) -> int:
        return self.x.shape[0]


@torch.no_grad()
def encode_each(backbone: Backbone, x: Tensor) -> Features:
    """The frozen encoder's features of (K, 3, S, S) inputs, one image at a time."""
    return Features.cat([backbone.encode(x[i : i + 1]) for i in range(len(x))])


@dataclass
class Target:
    """One target image: ``image`` (C, H0, W0) as loaded, its encoder input ``x`` (1, 3, S, S) and geometry, the
    frozen encoder's ``features``, and ``truth`` (1, N, H0, W0) — read only by the methods that stand for a human
    prompting every image (box, point) and by the metric."""

    image: Tensor
    x: Tensor
    geo: Geometry
    features: Features
    truth: Tensor


class Method:
    """A segmentation method in the comparison.

    ``fit`` sees the training pairs once (methods that train do so there), ``set_support`` sees each support draw,
    ``predict`` segments one target. ``models_trained`` is the paper's "Training times" column: how many models must
    be trained to segment all N objects. ``needs`` says what a user gives. ``uses_support`` is False for
    methods whose result does not depend on the support draw (prompted by a human, or trained on the training set).
    """

    name: str = ""
    needs: str = "K support pairs, once"  # what a user gives
    uses_support: bool = True

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone

    def models_trained(self, num_objects: int) -> int:
        return 0

    def fit(self, train: Pairs, seed: int = 0) -> None:
        """Train on the training pairs (no-op for training-free methods)."""

    def set_support(self, support: Pairs) -> None:
        """Take a support set (no-op for methods that use none)."""

    def predict(self, target: Target, seed: int = 0) -> Tensor:
        """(1, N, H0, W0) logits for the target."""
        raise NotImplementedError

    # --- helpers shared by the prompted methods ------------------------------------------------------------------
    def decode(self, target: Target, sparse: Tensor, dense: Tensor) -> Tensor:
        """The frozen decoder on one target: (N, T, C) sparse and (N, C, H, W) dense prompts -> (N, h, w) low-res
        logits in the padded input frame."""
        return self.backbone.decode(target.features, sparse[None], dense[None])[0]

    def to_original(self, low: Tensor, target: Target) -> Tensor:
        """(N, h, w) low-res logits -> (1, N, H0, W0)."""
        return self.backbone.postprocess(low[None], target.geo)

    def prompt(
        self,
        target: Target,
        *,
        points: tuple[Tensor, Tensor] | None = None,
        box: Tensor | None = None,
        mask: Tensor | None = None,
        fallback_box: Tensor | None = None,
    ) -> Tensor:
        """One object's prompts -> (h4, w4) low-res logits. Points and mask are left out where the backbone was not
        trained with them (`Backbone.prompt_kinds`); ``fallback_box`` stands in for the points then. No prompt left:
        an empty mask.

        Args:
            points: (P, 2) xy in input pixels and (P,) labels (1 positive, 0 negative).
            box: (4,) xyxy in input pixels.
            mask: (h4, w4) logits, SAM's previous-prediction input.
        """
        bb = self.backbone
        if "point" not in bb.prompt_kinds and points is not None:
            points, box = None, box if box is not None else fallback_box
        if "mask" not in bb.prompt_kinds:
            mask = None
        if points is None and box is None and mask is None:
            side = bb.prompt_encoder.mask_input_size
            return torch.full(tuple(side), EMPTY_LOGIT, device=bb.device)
        sparse, dense = bb.prompt_encoder(
            points=None if points is None else (points[0][None].to(bb.device), points[1][None].int().to(bb.device)),
            boxes=None if box is None else box[None].to(bb.device),
            masks=None if mask is None else mask[None, None].to(bb.device),
        )
        return self.decode(target, sparse, dense)[0]

    def empty(self, target: Target) -> Tensor:
        return torch.full((1, target.truth.shape[1], *target.geo.original), EMPTY_LOGIT)


def input_scale(geo: Geometry) -> Tensor:
    """Factors (x, y) from the original image's pixels to the encoder input's."""
    return torch.tensor([geo.resized[1] / geo.original[1], geo.resized[0] / geo.original[0]])


def downsample(masks: Tensor, size: int) -> Tensor:
    """(..., S, S) masks -> (..., size, size) area fractions."""
    lead = masks.shape[:-2]
    out = F.interpolate(masks.reshape(-1, 1, *masks.shape[-2:]).float(), size=(size, size), mode="area")
    return out.reshape(*lead, size, size)


def valid_grid(geo: Geometry, img_size: int, side: int) -> Tensor:
    """(side, side) bool: the cells of a side x side grid over the padded input that lie on the image."""
    h, w = (int(round(r * side / img_size)) for r in geo.resized)
    out = torch.zeros(side, side, dtype=torch.bool)
    out[: max(h, 1), : max(w, 1)] = True
    return out


def component_at(region: Tensor, index: int) -> Tensor:
    """(h, w) bool region -> its 4-connected component holding the cell at flat ``index`` (empty if not in it)."""
    seed = torch.zeros_like(region)
    seed.view(-1)[index] = True
    comp, grown = seed & region, None
    while grown is None or not torch.equal(grown, comp):
        grown = comp
        c = comp.float()[None, None]
        cross = F.max_pool2d(c, (3, 1), 1, (1, 0)) + F.max_pool2d(c, (1, 3), 1, (0, 1))
        comp = (cross[0, 0] > 0) & region
    return comp


def cell_centres(index: Tensor, side: int, img_size: int) -> Tensor:
    """Flat indices into a (side, side) grid -> (..., 2) xy coordinates of the cells' centres in input pixels."""
    y, x = index // side, index % side
    return (torch.stack([x, y], -1).float() + 0.5) * (img_size / side)
