"""The peer methods: each runs on a tiny generated case with the right mask size and is deterministic under a seed;
the training-free ones find a bright disk with the real LiteMedSAM; the registration carries a mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice

from ppgseg.backbones import build_sam_tiny
from ppgseg.build import build_model
from ppgseg.data.contract import Sample
from ppgseg.data.generated.shapes import two_object_set
from ppgseg.evaluation.baselines import BASELINES, MedPerSAM, Pairs, PerSAM, ProxyPrompt, Target
from ppgseg.evaluation.baselines.base import component_at
from ppgseg.evaluation.baselines.registration import PairRegistration


def make_target(backbone, image: torch.Tensor, masks: torch.Tensor) -> Target:
    x, geo = backbone.preprocess(image[None])
    with torch.no_grad():
        features = backbone.encode(x)
    return Target(image, x, geo, features, masks[None])


@pytest.fixture(scope="module")
def tiny_case():
    images, masks = two_object_set(5, size=128, seed=3)
    images, masks = images[..., :112], masks[..., :112]  # 128 x 112: not square
    samples = [Sample(images[i], (masks[i, 0] + 2 * masks[i, 1]).long(), f"s{i}") for i in range(5)]
    return images, masks, samples


def run_method(key: str, tiny_case) -> torch.Tensor:
    images, masks, samples = tiny_case
    torch.manual_seed(0)
    backbone = build_sam_tiny().eval()
    pairs = Pairs.encode(backbone, samples[:4], [1, 2])
    if key == "ppg":
        method = ProxyPrompt(build_model("sam_tiny", "tiny"))
    elif key == "finetune":
        method = BASELINES[key](backbone, steps=3, batch=2)
    elif key == "medpersam":
        method = MedPerSAM(backbone, registration=PairRegistration(affine_steps=3, deform_steps=3))
    else:
        method = BASELINES[key](backbone)
    method.fit(pairs, seed=0)
    method.set_support(pairs.select([0, 1]))
    return method.predict(make_target(backbone, images[4], masks[4]), seed=7)


@pytest.mark.parametrize("key", ["ppg", *BASELINES])
def test_each_method_runs_at_the_image_size_and_repeats_under_a_seed(key, tiny_case):
    out = run_method(key, tiny_case)
    assert out.shape == (1, 2, 128, 112) and torch.isfinite(out).all()
    assert torch.equal(out, run_method(key, tiny_case))


def test_decoder_fine_tune_trains_lora_only_and_leaves_the_backbone_alone(tiny_case):
    _, _, samples = tiny_case
    torch.manual_seed(0)
    backbone = build_sam_tiny().eval()
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    method = BASELINES["finetune"](backbone, steps=3, batch=2)
    method.fit(Pairs.encode(backbone, samples[:4], [1, 2]))
    assert len(method.adapters) == 2 and method.models_trained(2) == 2
    assert not any(".lora_" in n for n, _ in backbone.named_parameters())
    assert all(torch.equal(before[n], p) for n, p in backbone.named_parameters())
    tuned = dict(method.tuned.named_parameters())
    assert all(tuned[n] is p for n, p in backbone.named_parameters() if "image_encoder" in n)  # encoder shared
    assert not torch.equal(method.adapters[0][1], method.adapters[1][1])  # one adapter per object
    assert {n for n, p in method.tuned.named_parameters() if p.requires_grad} == {
        n for n in tuned if ".lora_" in n and "mask_decoder" in n
    }


def disk_image(cy: float, cx: float, r: float, seed: int, h: int = 180, w: int = 240):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    image = 60 + rng.normal(0, 6, (h, w))
    image[disk] = 200 + rng.normal(0, 6, int(disk.sum()))
    image = torch.from_numpy(np.clip(image, 0, 255).astype(np.uint8))[None].expand(3, h, w)
    return image, torch.from_numpy(disk).float()[None]


@pytest.mark.parametrize("method", [PerSAM, MedPerSAM])
def test_training_free_methods_find_a_bright_disk(method, litemedsam_backbone):
    bb = litemedsam_backbone
    image, mask = disk_image(70, 100, 30, seed=0)
    support = Pairs.encode(bb, [Sample(image, mask[0].long(), "support")], [1])
    target_image, truth = disk_image(105, 150, 38, seed=1)
    target = make_target(bb, target_image, truth)
    m = method(bb)
    m.set_support(support)
    out = m.predict(target, seed=0)
    assert out.shape == (1, 1, 180, 240)
    dice = compute_dice((out > 0).float(), truth[None]).item()
    empty = compute_dice(torch.zeros_like(truth)[None], truth[None]).item()
    assert empty == 0 and dice > 0.8, dice


def test_registration_carries_a_mask_onto_a_moved_object():
    image, mask = disk_image(70, 100, 30, seed=0, h=128, w=128)
    moved, moved_mask = disk_image(85, 80, 34, seed=1, h=128, w=128)
    reg = PairRegistration()
    ddf = reg(image[None].float(), moved[None].float())
    assert ddf.shape == (1, 2, 128, 128)
    warped = reg.apply(mask[None], ddf)
    assert compute_dice((warped > 0.5).float(), moved_mask[None]).item() > 0.9
    assert compute_dice(mask[None], moved_mask[None]).item() < 0.6  # it did have to move
    with pytest.raises(ValueError, match="moving and fixed"):
        reg(image[None].float(), moved[None, :, :64].float())


def test_component_at_keeps_the_touching_region_only():
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[1:3, 1:3] = True
    region[5:7, 5:8] = True
    comp = component_at(region, 1 * 8 + 1)
    assert comp.sum() == 4 and comp[1:3, 1:3].all() and not comp[5:].any()
    assert not component_at(region, 0).any()


def test_pairs_keep_sam2_high_resolution_levels(tiny_case):
    from ppgseg.build import build_backbone

    _, _, samples = tiny_case
    torch.manual_seed(0)
    sam2 = build_backbone("sam2", pretrained=False, backbone_kwargs={"image_size": 256}).eval()
    pairs = Pairs.encode(sam2, samples[:2], [1, 2])
    both = Pairs.cat([pairs, pairs.select([1])])
    assert len(pairs.features.high_res) == 2 and len(both) == 3
    assert [f.shape[0] for f in both.features.high_res] == [3, 3]  # what SAM 2's decoder needs for every pair
    assert torch.equal(both.features.high_res[0][2], pairs.features.high_res[0][1])
