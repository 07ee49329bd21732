"""ProxyPromptSAM: a frozen SAM-family backbone prompted by the Proxy Prompt Generator (paper Fig. 3, Eq. 12)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.base import Backbone, Features, mask_box
from ..lora import lora_disabled
from .checks import check_in_frame, check_support
from .generator import ProxyPromptGenerator, Selected, SupportEmbedding
from .prompt_route import PromptRoute

ENCODE_BATCH = 32  # images per encoder call on an accelerator


class ProxyPromptSAM(nn.Module):
    """Segments N objects in any number of targets from a support set of K image-mask pairs.

    The prompt reaches the frozen mask decoder by a `PromptRoute` (``prompt_route.py``): P alone as Eq. 12
    (``paper``), or P with the support masks carried to the target by the Selective map in SAM's mask-prompt slot
    (``transfer``), or the ablations of either.

    Args:
        backbone: frozen SAM-family model (with LoRA adapters where the preset puts them).
        generator: the PPG.
        route: how P (and the carried masks) enter the decoder.
        config: the preset's settings, stored with checkpoints.
    """

    def __init__(
        self, *, backbone: Backbone, generator: ProxyPromptGenerator, route: PromptRoute, config: dict | None = None
    ) -> None:
        super().__init__()
        self.backbone, self.generator, self.route = backbone, generator, route
        self.config = dict(config or {})

    def train(self, mode: bool = True) -> ProxyPromptSAM:
        """Only the PPG switches mode: the frozen backbone keeps its pretrained normalisation statistics."""
        super().train(mode)
        self.backbone.eval()
        return self

    # --- features ------------------------------------------------------------------------------------------------
    @property
    def encoder_trains(self) -> bool:
        """Whether the image encoder has trainable (LoRA) weights; if not, its features can be cached."""
        return any(p.requires_grad for p in self.backbone.model.image_encoder.parameters())

    def encode_images(self, x: Tensor) -> Features:
        """Backbone features of preprocessed images (B, 3, S, S); no autograd where the encoder has no LoRA.

        On CPU the images go through the encoder one at a time: batching them is slower there (TinyViT, 2 cores:
        8 images batched 12.5 s, one by one 9.0 s). Elsewhere in batches of at most ``ENCODE_BATCH``, so that a whole
        training bank does not hold every image's activations at once.
        """
        step = 1 if x.device.type == "cpu" else ENCODE_BATCH
        if x.shape[0] > step:
            return Features.cat([self.encode_images(x[i : i + step]) for i in range(0, x.shape[0], step)])
        if self.encoder_trains:
            return self.backbone.encode(x)
        with torch.no_grad():
            return self.backbone.encode(x)

    def to_grid(self, embed: Tensor) -> Tensor:
        """(B, C, H, W) encoder features -> (B, C, g, g) on the PPG grid (area pooling where the grid is coarser)."""
        g = self.generator.grid
        return embed if embed.shape[-1] == g else F.adaptive_avg_pool2d(embed, g)

    # --- support ---------------------------------------------------------------------------------------------------
    def encode_support(self, images: Tensor, masks: Tensor) -> SupportEmbedding:
        """Encode a support set once; `segment` reuses it for every target.

        Args:
            images: (K, 1 or 3, H, W) as loaded (uint8, or float in any range).
            masks: (K, N, H, W) in {0, 1}: mask n of pair k outlines object n in image k.
        """
        x, m = self.prepare_support(images, masks)
        return self.encode_prepared_support(x, m, self.encode_images(x))

    def prepare_support(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Check a support set and bring it into the encoder's frame: (K, 3, S, S) images, (K, N, S, S) masks."""
        check_support(images, masks)
        x, geo = self.backbone.preprocess(images)
        framed = self.backbone.preprocess_masks(masks, geo)
        for k in range(masks.shape[0]):
            check_in_frame(masks[k], framed[k], f"support pair {k}", geo.resized)
        return x, framed

    def encode_prepared_support(self, x: Tensor, masks: Tensor, features: Features) -> SupportEmbedding:
        """As `encode_support`, from preprocessed inputs and their (possibly cached) backbone features."""
        return self.generator.encode_support(x, masks, self.to_grid(features.embed))

    # --- targets ---------------------------------------------------------------------------------------------------
    def segment(
        self,
        targets: Tensor,
        support: SupportEmbedding,
        *,
        with_iou: bool = False,
        min_carried: float = 0.0,
        box_refine: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """(B, 1 or 3, H, W) targets as loaded -> (B, N, H, W) mask logits at the targets' size (and, with
        ``with_iou``, the mask decoder's predicted IoU of each mask, (B, N)). ``min_carried``, ``box_refine``: see
        `segment_features`."""
        x, geo = self.backbone.preprocess(targets)
        out = self.segment_features(
            self.encode_images(x), support, with_iou=with_iou, min_carried=min_carried, box_refine=box_refine
        )
        if with_iou:
            return self.backbone.postprocess(out[0], geo), out[1]
        return self.backbone.postprocess(out, geo)

    def segment_features(
        self,
        features: Features,
        support: SupportEmbedding,
        *,
        with_iou: bool = False,
        min_carried: float = 0.0,
        box_refine: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Backbone features of B targets -> (B, N, 4H, 4W) low-res logits in the padded input frame.

        ``min_carried`` > 0: an object that the Selective map carries nowhere on a target (its carried support mask
        stays below ``min_carried`` in every cell: no target patch resembles the object's support patches) is
        answered as background (logit -20, IoU 0) without running the mask decoder for it, the costly part once the
        features are cached (one decode per object and target). Every other object is decoded as without it.

        ``box_refine``: see `refine_with_box`; the IoU returned stays the first pass's.
        """
        selected = self.select(features, support)
        logits, iou = self.decode(features, selected, selected.carried(min_carried), box_refine=box_refine)
        return (logits, iou) if with_iou else logits

    def decode(
        self, features: Features, selected: Selected, asked: Tensor | None = None, *, box_refine: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The one decoding step after `select`: B targets' features and the Selective map's reading of them ->
        (B, N, 4H, 4W) low-res logits in the padded input frame and the decoder's predicted IoU (B, N).

        The CCM and the mask decoder run on the (target, object) pairs in ``asked`` (B, N) only (default: all); the
        others are background (logit -20, IoU 0) at no cost. A pair's result does not depend on which others are
        asked, so a caller may decode a volume's slices in any order and number (`inference.sparse`).
        ``box_refine``: see `refine_with_box`; the IoU returned stays the first pass's.
        """
        if asked is None:
            asked = selected.coarse.new_ones(selected.coarse.shape[:2], dtype=torch.bool)
        logits, iou = self.decode_kept(features, self.tokens(selected, asked), selected.coarse, asked)
        if box_refine and self.route.uses_decoder:
            logits = self.refine_with_box(features, logits)
        return logits, iou

    def refine_with_box(self, features: Features, low: Tensor) -> Tensor:
        """A second, self-prompted pass: each object's mask from the first pass gives a box around it, the backbone
        as it shipped (LoRA adapters off, as the box baseline runs it) is asked again with that box alone (the prompt
        SAM-family models, LiteMedSAM above all, were trained with), and the two passes' logits are averaged. The
        proxy prompt finds the object; the box pass draws its boundary as the backbone does for a user's box, with no
        user. An object the first pass left empty keeps it.

        Args:
            features: the targets' backbone features, batch B.
            low: (B, N, s, s) first-pass low-res logits in the padded input frame.
        """
        found = low > 0
        has = found.flatten(2).any(2)  # (B, N)
        if not bool(has.any()):
            return low
        at, obj = has.nonzero(as_tuple=True)
        boxes = torch.stack([mask_box(m) for m in found[at, obj]]) * (self.backbone.img_size / low.shape[-1])
        corners, _ = self.backbone.prompt_encoder(points=None, boxes=boxes, masks=None)  # (M, 2, C)
        with lora_disabled(self.backbone):
            second = self.backbone.decode(features.select(at.tolist()), corners[:, None])  # (M, 1, s, s)
        out = low.clone()
        out[at, obj] = (low[at, obj] + second[:, 0]) / 2
        return out

    def select(self, features: Features, support: SupportEmbedding) -> Selected:
        """The PPG up to the CCM for B targets (`ProxyPromptGenerator.select`); `decode` finishes it."""
        return self.generator.select(self.to_grid(features.embed), support)

    def tokens(self, selected: Selected, asked: Tensor) -> Tensor:
        """P (B, N, T, C) with the pairs in ``asked`` (B, N) colorized by the CCM, zeros elsewhere. The CCM runs once
        per (target, object) pair, so pairs the decoder will not read cost nothing."""
        if bool(asked.all()):
            return self.generator.colorize(selected)
        b, n, hw, c = selected.ctx.shape
        into = selected.ctx.new_zeros(b, n, hw // self.generator.colorizer.reduction, c)
        pairs = asked.nonzero(as_tuple=True)
        return into.index_put(pairs, self.generator.colorize(selected, pairs)) if len(pairs[0]) else into

    def decode_kept(self, features: Features, tokens: Tensor, coarse: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, 4H, 4W) low-res logits and IoU (B, N) of the (target, object) pairs in ``keep`` (B, N); the others
        are background (logit -20, IoU 0) with no decode. Each target's kept objects go through the decoder in one
        call (the decoder works per prompt, but batching the prompts of one image is cheaper)."""
        if not self.route.uses_decoder or bool(keep.all()):
            return self.route(self.backbone, features, tokens, coarse, with_iou=True)
        b, n = keep.shape
        side = 4 * features.embed.shape[-1]
        logits, iou = coarse.new_full((b, n, side, side), -20.0), coarse.new_zeros(b, n)
        for t in keep.any(1).nonzero()[:, 0].tolist():
            obj = keep[t].nonzero()[:, 0]
            out, score = self.route(
                self.backbone, features.select([t]), tokens[t, obj][None], coarse[t, obj][None], with_iou=True
            )
            logits[t, obj], iou[t, obj] = out[0], score[0]
        return logits, iou

    def forward(self, targets: Tensor, support_images: Tensor, support_masks: Tensor) -> Tensor:
        """Uncached: encode the support set and segment the targets in one call."""
        return self.segment(targets, self.encode_support(support_images, support_masks))
