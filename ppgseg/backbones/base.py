"""One interface over SAM-family models: preprocess, encode, decode with prompt tokens, postprocess."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Features(NamedTuple):
    """Frozen-encoder output: ``embed`` (B, C, H, W); ``high_res`` holds SAM 2's finer maps (empty for SAM)."""

    embed: Tensor
    high_res: tuple[Tensor, ...] = ()

    def select(self, index: slice | Sequence[int]) -> Features:
        """The features of the images at ``index`` (a slice or a list of positions)."""
        return Features(self.embed[index], tuple(f[index] for f in self.high_res))

    def to(self, device: torch.device | str) -> Features:
        """The same features on ``device``, every level."""
        return Features(self.embed.to(device), tuple(f.to(device) for f in self.high_res))

    @staticmethod
    def cat(parts: Sequence[Features]) -> Features:
        """The features of several batches as one batch, every level concatenated."""
        levels = zip(*(p.high_res for p in parts), strict=True)
        return Features(torch.cat([p.embed for p in parts]), tuple(torch.cat(level) for level in levels))


@dataclass(frozen=True)
class Geometry:
    """Where an (H0, W0) image sits in the padded square input: resized to (h, w), top-left aligned."""

    original: tuple[int, int]
    resized: tuple[int, int]


def mask_box(mask: Tensor) -> Tensor | None:
    """(H, W) binary mask -> its bounding box (4,) xyxy in pixel edges, or None when empty."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if len(ys) == 0:
        return None
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def to_unit_range(images: Tensor) -> Tensor:
    """Images as loaded -> float in [0, 1].

    uint8 is divided by 255; float already in [0, 1] is kept; float in [0, 255] (PNG read as float) is divided by 255;
    anything else (CT in HU, MR) is min-max scaled per image.
    """
    if images.dtype == torch.uint8:
        return images.float() / 255
    x = images.float()
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    if bool((lo >= 0).all() and (hi <= 1).all()):
        return x
    if bool((lo >= 0).all() and (hi <= 255).all()):
        return x / 255
    return (x - lo) / (hi - lo).clamp_min(1e-8)


class Backbone(nn.Module):
    """A frozen SAM-family model seen through the calls the PPG needs.

    Subclasses set ``model`` (the library's own module), ``img_size``, ``feat_size``, ``embed_dim``, the regexes
    ``encoder_lora_targets`` / ``decoder_lora_targets`` (module names, relative to this adapter, that get LoRA) and
    implement ``normalize``, ``encode`` and ``_decode_one``. ``prompt_kinds`` names the prompts the model was trained
    with (the prompted baselines leave out the others).
    """

    prompt_kinds: tuple[str, ...] = ("point", "box", "mask")

    name: str
    img_size: int
    feat_size: int
    embed_dim: int
    encoder_lora_targets: str
    decoder_lora_targets: str
    model: nn.Module

    # --- preprocessing -------------------------------------------------------------------------------------------
    def geometry(self, size: tuple[int, int]) -> Geometry:
        h, w = size
        scale = self.img_size / max(h, w)
        return Geometry((h, w), (int(h * scale + 0.5), int(w * scale + 0.5)))

    def preprocess(self, images: Tensor) -> tuple[Tensor, Geometry]:
        """(B, 1 or 3, H0, W0) images as loaded -> (B, 3, S, S) encoder input, and where they sit in it."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is empty (B = 0)")
        geo = self.geometry(tuple(images.shape[-2:]))
        x = to_unit_range(images.to(self.device))
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=geo.resized, mode="bilinear", align_corners=False, antialias=True)
        x = self.normalize(x.clamp(0, 1))
        return self._pad(x, geo), geo

    def preprocess_masks(self, masks: Tensor, geo: Geometry) -> Tensor:
        """(B, N, H0, W0) binary masks -> (B, N, S, S) float masks in the encoder's frame."""
        m = F.interpolate(masks.to(self.device).float(), size=geo.resized, mode="bilinear", align_corners=False)
        return self._pad((m > 0.5).float(), geo)

    def _pad(self, x: Tensor, geo: Geometry) -> Tensor:
        h, w = geo.resized
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def normalize(self, x: Tensor) -> Tensor:
        """(B, 3, h, w) in [0, 1] -> what the encoder was trained on."""
        raise NotImplementedError

    # --- encoder / decoder ---------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Features:
        """(B, 3, S, S) preprocessed -> Features with embed (B, C, H, W)."""
        raise NotImplementedError

    def _decode_one(self, features: Features, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        """One image's features, (N, T, C) sparse prompts -> (N, 1, 4H, 4W) low-res logits and the decoder's
        predicted IoU (N, 1)."""
        raise NotImplementedError

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.model.prompt_encoder

    def embed_mask(self, probs: Tensor) -> Tensor:
        """SAM's own mask-prompt path: (B, N, h, w) foreground probabilities -> (B, N, C, H, W) dense embeddings."""
        b, n = probs.shape[:2]
        size = tuple(self.prompt_encoder.mask_input_size)
        x = F.interpolate(probs.flatten(0, 1).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        logits = 20 * (x - 0.5)  # SAM takes a previous prediction's logits: +-10 for certain fore/background
        return self.prompt_encoder._embed_masks(logits).unflatten(0, (b, n))

    def decode(
        self, features: Features, prompts: Tensor, dense: Tensor | None = None, *, with_iou: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Frozen mask decoder with prompt tokens.

        Args:
            features: from `encode`, batch B.
            prompts: (B, N, T, C) sparse prompt tokens (the proxy prompts, or a box's two corner tokens).
            dense: (B, N, C, H, W) dense prompt embeddings (`embed_mask`), or None for SAM's ``no_mask_embed``.
            with_iou: also return the decoder's own estimate of each mask's IoU, (B, N).
        Returns:
            (B, N, 4H, 4W) low-resolution mask logits in the padded input frame.
        """
        if prompts.dim() != 4 or prompts.shape[0] != features.embed.shape[0]:
            raise ValueError(f"prompts must be (B={features.embed.shape[0]}, N, T, C), got {tuple(prompts.shape)}")
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            1, -1, self.feat_size, self.feat_size
        )  # what SAM adds to the image embedding when no mask prompt is given
        out = [
            self._decode_one(features.select(slice(b, b + 1)), prompts[b], no_mask if dense is None else dense[b])
            for b in range(prompts.shape[0])
        ]
        logits = torch.stack([o[0][:, 0] for o in out])  # B x (N, 1, h, w) -> (B, N, h, w)
        return (logits, torch.stack([o[1][:, 0] for o in out])) if with_iou else logits

    def token_pe(self, side: int) -> Tensor:
        """SAM's positional encoding at the centres of a (side, side) grid over the image: (side*side, C)."""
        pe = self.prompt_encoder.pe_layer((side, side))  # (C, side, side)
        return pe.flatten(1).transpose(0, 1)

    def postprocess(self, low_res: Tensor, geo: Geometry) -> Tensor:
        """(B, N, h, w) low-res logits -> (B, N, H0, W0) logits at the original size."""
        x = F.interpolate(low_res, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = x[..., : geo.resized[0], : geo.resized[1]]
        return F.interpolate(x, size=geo.original, mode="bilinear", align_corners=False)

    # --- the box baseline ----------------------------------------------------------------------------------------
    def predict_box(self, images: Tensor, boxes: Tensor) -> Tensor:
        """The backbone prompted with one box per image.

        Args:
            images: (B, 1 or 3, H0, W0) as loaded.
            boxes: (B, 4) xyxy in the images' pixels.
        Returns:
            (B, 1, H0, W0) logits.
        """
        if boxes.shape != (images.shape[0], 4):
            raise ValueError(f"boxes must be (B={images.shape[0]}, 4) xyxy, got {tuple(boxes.shape)}")
        x, geo = self.preprocess(images)
        scale = torch.tensor(
            [geo.resized[1] / geo.original[1], geo.resized[0] / geo.original[0]] * 2, device=self.device
        )
        sparse, _ = self.prompt_encoder(points=None, boxes=boxes.to(self.device).float() * scale, masks=None)
        low = self.decode(self.encode(x), sparse.unsqueeze(1))  # (B, 2, C) -> (B, 1, 2, C)
        return self.postprocess(low, geo)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def encoder_frame(backbone: Backbone, image: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """One (C, H, W) image and its (N, H, W) masks -> (1, 3, S, S) encoder input and (1, N, S, S) masks."""
    x, geo = backbone.preprocess(image[None])
    return x, backbone.preprocess_masks(masks[None], geo)
