"""Peers of the volume protocol: what a radiologist has without the PPG. From drawn slices: the nearest drawn slice
copied, and shape-based interpolation between drawn slices (Slicer's "Fill between slices"). From labelled studies:
a MONAI 3D UNet trained on them for a fixed CPU time. And LiteMedSAM prompted with the ground-truth box on every
slice (MedSAM's way, an oracle of the object's extent)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms.utils import distance_transform_edt
from torch import Tensor

from ...backbones.base import mask_box
from ...inference.atlas import carry_between
from ...inference.slices import to_label
from ...inference.volume import EncodedVolume
from ...modeling.proxy_sam import ProxyPromptSAM


def nearest_copy(drawn: dict[int, Tensor], depth: int) -> Tensor:
    """(Z, H, W): every slice gets the label map of the nearest drawn slice (the lower one on a tie)."""
    keys = sorted(drawn)
    return torch.stack([drawn[min(keys, key=lambda d: (abs(d - z), d))] for z in range(depth)])


def registered_slices(drawn: dict[int, Tensor], slices: Tensor, label_ids: Sequence[int]) -> Tensor:
    """(Z, H, W): slice-to-slice registration, no model. The drawn label maps carried to every slice by chains of 2D
    demons registrations of each slice onto the next (`carry_between`: from both drawn ends between two drawn slices,
    mixed by distance), each object kept where its fraction is above a half. ``slices`` (Z, H, W): the volume's
    images."""
    masks = {z: torch.stack([lab == i for i in label_ids]).float().numpy() for z, lab in drawn.items()}
    return to_label(torch.from_numpy(carry_between(slices.numpy(), masks)) - 0.5, label_ids)


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Negative inside, positive outside (pixels); a large positive value everywhere for an empty mask."""
    if not mask.any():
        return np.full(mask.shape, 1e3, dtype=np.float32)
    inside = np.asarray(distance_transform_edt(mask[None]))[0]
    outside = np.asarray(distance_transform_edt(~mask[None]))[0]
    return (outside - inside).astype(np.float32)


def interpolate_slices(drawn: dict[int, Tensor], depth: int, label_ids: Sequence[int]) -> Tensor:
    """(Z, H, W): shape-based interpolation. Between two neighbouring drawn slices, each label's signed distance maps
    are blended linearly and thresholded at 0; slices outside the drawn range stay empty."""
    keys = sorted(drawn)
    shape = drawn[keys[0]].shape
    out = torch.zeros((depth, *shape), dtype=torch.uint8)
    for z in keys:
        out[z] = drawn[z].to(torch.uint8)
    for a, b in zip(keys, keys[1:], strict=False):
        for i in label_ids:
            da, db = (signed_distance(drawn[k].numpy() == i) for k in (a, b))
            for z in range(a + 1, b):
                w = (z - a) / (b - a)
                inside = torch.from_numpy((1 - w) * da + w * db < 0)
                out[z][inside & (out[z] == 0)] = i
    return out


def box_slices(model: ProxyPromptSAM, volume: EncodedVolume, truth: Tensor, label_ids: Sequence[int]) -> Tensor:
    """(Z, H, W): the backbone as it ships, prompted on every slice with each label's ground-truth box (where the
    label is present), from the slices' encoded features."""
    geo = model.backbone.geometry(volume.size)
    scale = torch.tensor([geo.resized[1] / geo.original[1], geo.resized[0] / geo.original[0]] * 2)
    out = torch.zeros((len(volume), *volume.size), dtype=torch.uint8)
    device = model.backbone.device
    with torch.no_grad():
        for z in range(len(volume)):
            best = torch.full(volume.size, 0.0)
            for i in label_ids:
                box = mask_box(truth[z] == i)
                if box is None:
                    continue
                sparse, _ = model.backbone.prompt_encoder(points=None, boxes=(box * scale)[None].to(device), masks=None)
                low = model.backbone.decode(volume.features.select([z]).to(device), sparse[:, None])
                logits = model.backbone.postprocess(low, geo)[0, 0].cpu()
                out[z][(logits > 0) & (logits > best)] = i
                best = torch.maximum(best, logits)
    return out


class UNetPeer:
    """A MONAI 3D UNet trained from scratch on K labelled volumes for ``seconds`` of CPU time (Adam, Dice + CE,
    random flips), then run on whole volumes: what a user would train instead of prompting.

    Args:
        num_labels: object labels (background excluded).
        seconds: training time budget.
        seed: initialisation and augmentation seed.
    """

    def __init__(self, num_labels: int, *, seconds: float = 120.0, seed: int = 0) -> None:
        self.num_labels, self.seconds, self.seed = num_labels, seconds, seed
        self.steps = 0

    def _net(self) -> UNet:
        return UNet(3, 1, self.num_labels + 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)

    @staticmethod
    def _pad(x: Tensor) -> tuple[Tensor, list[int]]:
        """(B, C, X, Y, Z) padded at the end to multiples of 8."""
        pad = [(-s) % 8 for s in x.shape[2:]]
        return F.pad(x, [p for s in reversed(pad) for p in (0, s)]), pad

    def fit(self, volumes: Sequence[tuple[Tensor, Tensor]]) -> UNetPeer:
        """``volumes``: (image (X, Y, Z) in [0, 1], label map (X, Y, Z)) pairs."""
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.net = self._net()
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        start = time.perf_counter()
        self.net.train()
        while time.perf_counter() - start < self.seconds:
            image, label = volumes[int(rng.integers(len(volumes)))]
            x, y = image[None, None].float(), label[None, None].long()
            for ax in range(3):
                if rng.random() < 0.5:
                    x, y = x.flip(2 + ax), y.flip(2 + ax)
            x, _ = self._pad(x)
            y, _ = self._pad(y)
            loss = loss_fn(self.net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.steps += 1
        return self

    def __call__(self, image: Tensor) -> Tensor:
        """(X, Y, Z) in [0, 1] -> (X, Y, Z) label map."""
        self.net.eval()
        x, _ = self._pad(image[None, None].float())
        with torch.no_grad():
            out = self.net(x).argmax(1)[0]
        return out[: image.shape[0], : image.shape[1], : image.shape[2]].to(torch.uint8)
