"""SAM 2 in image mode, through sam2's own builder and modules."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .base import Backbone, Features, Geometry
from .sam import load_state_strict, require_checkpoint

SAM2_CONFIGS = {
    "sam2.1_hiera_tiny.pt": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small.pt": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus.pt": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large.pt": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Sam2Backbone(Backbone):
    """SAM 2's image path: square resize (as SAM2ImagePredictor does), ImageNet mean/std on [0, 1],
    Hiera + FPN features with ``no_mem_embed`` added (a frame with no memory), SAM 2's mask decoder with its
    high-resolution skip features."""

    encoder_lora_targets = r"model\.image_encoder\.trunk\.blocks\.\d+\.attn\.qkv"
    decoder_lora_targets = r"model\.sam_mask_decoder\.transformer\..*\.(q_proj|k_proj|v_proj|out_proj)"

    def __init__(self, sam2_model: torch.nn.Module, name: str = "sam2") -> None:
        super().__init__()
        self.model, self.name = sam2_model, name
        self.img_size = sam2_model.image_size
        self.feat_size = sam2_model.sam_image_embedding_size
        self.embed_dim = sam2_model.sam_prompt_embed_dim
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def prompt_encoder(self) -> torch.nn.Module:
        return self.model.sam_prompt_encoder

    def geometry(self, size: tuple[int, int]) -> Geometry:
        return Geometry(tuple(size), (self.img_size, self.img_size))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def encode(self, x: Tensor) -> Features:
        return self.image_features(*self.frame_features(x)[::2])

    def frame_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
        """(B, 3, S, S) -> SAM 2's own per-level lists: features (HW, B, C), their positional encodings, (H, W)."""
        _, vision_feats, vision_pos, feat_sizes = self.model._prepare_backbone_features(self.model.forward_image(x))
        return vision_feats, vision_pos, feat_sizes

    def image_features(self, vision_feats: list[Tensor], feat_sizes: list[tuple[int, int]]) -> Features:
        """SAM 2's per-level features -> Features of a frame with no memory (``no_mem_embed`` added)."""
        b = vision_feats[-1].shape[1]
        last = vision_feats[-1] + self.model.no_mem_embed if self.model.directly_add_no_mem_embed else vision_feats[-1]
        maps = [
            f.permute(1, 2, 0).reshape(b, -1, *s) for f, s in zip([*vision_feats[:-1], last], feat_sizes, strict=True)
        ]
        # (HW, B, C) -> (B, C, H, W) per level, finest first
        return Features(maps[-1], tuple(maps[:-1]) if self.model.use_high_res_features_in_sam else ())

    def _decode_one(self, features: Features, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        masks, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=features.embed,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=True,
            high_res_features=list(features.high_res) or None,
        )
        return masks, iou


def build_sam2_backbone(
    checkpoint: str | Path | None, config: str | None = None, pretrained: bool = True, image_size: int | None = None
) -> Sam2Backbone:
    """sam2's ``build_sam2`` on CPU; the config follows the checkpoint's file name unless given."""
    from sam2.build_sam import build_sam2

    path = None
    if pretrained:
        path = require_checkpoint(
            checkpoint,
            "sam2",
            "a SAM 2.1 checkpoint such as sam2.1_hiera_tiny.pt",
            "the sam2 release (github.com/facebookresearch/sam2)",
        )
        config = config or SAM2_CONFIGS.get(path.name)
        if config is None:
            raise ValueError(
                f"cannot tell the sam2 config for {path.name}: pass sam2_config= one of "
                f"{sorted(set(SAM2_CONFIGS.values()))}"
            )
    overrides = [] if image_size is None else [f"++model.image_size={image_size}"]
    model = build_sam2(
        config or SAM2_CONFIGS["sam2.1_hiera_tiny.pt"],
        ckpt_path=None,
        device="cpu",
        hydra_overrides_extra=overrides,
        apply_postprocessing=False,
    )
    if path is not None:
        load_state_strict(model, path, "sam2")
    return Sam2Backbone(model)
