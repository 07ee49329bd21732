"""Checks with the real LiteMedSAM weights: they prove weights and preprocessing, and that the PPG learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import compute_dice

from ppgseg import build_model
from ppgseg.data.contract import Sample
from ppgseg.data.synthetic import two_object_set
from ppgseg.training import EpisodeBank, train_episodes


def test_box_prompt_segments_a_bright_disk(litemedsam_backbone):
    rng = np.random.default_rng(0)
    h, w = 180, 240  # not square: exercises resize-longest-side, padding and the way back
    yy, xx = np.mgrid[:h, :w]
    image = 60 + rng.normal(0, 6, (h, w))
    disk = (yy - 80) ** 2 + (xx - 140) ** 2 <= 35**2
    image[disk] = 200 + rng.normal(0, 6, int(disk.sum()))
    images = torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8))[None, None].expand(1, 3, h, w)
    box = torch.tensor([[140 - 45, 80 - 45, 140 + 45, 80 + 45]], dtype=torch.float32)
    with torch.no_grad():
        logits = litemedsam_backbone.predict_box(images, box)
    assert logits.shape == (1, 1, h, w)
    dice = compute_dice((logits > 0).float(), torch.from_numpy(disk)[None, None].float())
    assert dice.item() > 0.9


@pytest.mark.parametrize(
    "prompt, loss",
    [("transfer", DiceLoss(sigmoid=True)), ("paper", DiceCELoss(sigmoid=True))],
    ids=["transfer-dice", "paper-dicece"],
)
def test_ppg_learns_and_follows_the_support_mask(prompt, loss):
    """Both routes learn a generated two-object task and follow the support: `transfer` (P + carried masks) with the
    paper's Dice loss, `paper` (P alone, Eq. 12) with Dice + BCE (with Dice alone it settles on empty masks)."""
    torch.manual_seed(0)
    model = build_model(
        "litemedsam", "cpu", vim_dim=32, vim_depth=1, vim_coarsen=1, ccm_heads=4, ccm_ffn=256, prompt=prompt
    )
    images, masks = two_object_set(20, 128, seed=1)
    labels = torch.where(masks[:, 0] > 0, 1, torch.where(masks[:, 1] > 0, 2, 0))
    samples = [Sample(images[i], labels[i], f"subject{i}") for i in range(16)]
    bank = EpisodeBank(model, samples, [1, 2], views=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = train_episodes(model, bank, steps=150, num_support=2, optimizer=optimizer, loss_fn=loss)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    held_out, truth = images[16:], masks[16:]
    with torch.no_grad():
        both = model.segment(held_out, model.encode_support(images[:2], masks[:2]))
        assert compute_dice((both > 0).float(), truth).mean(0).min() > 0.8
        for obj, other in ((0, 1), (1, 0)):  # same weights, the support mask decides the target
            pred = (model.segment(held_out, model.encode_support(images[:2], masks[:2, [obj]])) > 0).float()
            assert compute_dice(pred, truth[:, [obj]]).mean() > 0.8
            assert compute_dice(pred, truth[:, [other]]).mean() < 0.2


def test_presets_put_lora_where_they_say_on_litemedsam():
    """`paper`: LoRA in TinyViT's attention and the decoder's; `cpu`: decoder only, encoder frozen (cacheable)."""
    for preset, encoder_lora in (("paper", True), ("cpu", False)):
        model = build_model("litemedsam", preset)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        in_encoder = [n for n in trainable if n.startswith("backbone.model.image_encoder.")]
        in_decoder = [n for n in trainable if n.startswith("backbone.model.mask_decoder.")]
        assert in_decoder and all(".lora_" in n for n in in_decoder + in_encoder)
        assert bool(in_encoder) == encoder_lora
        assert len(in_encoder) == (2 * 10 if encoder_lora else 0)  # lora_A and lora_B on each of 10 TinyViT blocks
