"""Propagation episodes on labelled volumes: n slices of a study taken as drawn, the rest of it prompted as `propagate`
prompts it (the nearest labelled slices as supports, the drawn masks carried to the slice by `carry_between` in the
dense slot), with the study's own label as the truth. Trained offline on other studies, they teach the decoder to
refine the carried masks of a structure; `RegistrationFineTune` trains on them as on `RegisteredEpisodes`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..backbones.base import Features
from ..inference.atlas import carry_between
from ..inference.slices import as_slices
from ..inference.volume import EncodedVolume, in_frame
from ..modeling.proxy_sam import ProxyPromptSAM
from .registered import prior_episode


def drawn_positions(label: Tensor, axis: int, n: int) -> list[int]:
    """``n`` slice indices along ``axis`` spread over the object's extent (at (i + 1) / (n + 1) of it)."""
    other = tuple(d for d in range(label.dim()) if d != axis)
    zs = label.bool().any(dim=other).nonzero()[:, 0]
    if len(zs) == 0:
        raise ValueError("the label is empty: no object to draw slices of")
    lo, hi = int(zs.min()), int(zs.max())
    return sorted({lo + round((hi - lo) * (i + 1) / (n + 1)) for i in range(n)})


class PropagationEpisodes:
    """Episodes of propagation from drawn slices, on labelled studies.

    For each study, the ``drawn`` slices at `drawn_positions` are its drawn ones; every other slice where the carried
    masks ask for an object (a half or more somewhere) is an episode. Its supports are the ``supports`` labelled
    slices nearest to it among the drawn ones and those nearer to a drawn slice than it is (`propagate`'s order),
    the latter with the carried masks as their masks (standing in for what propagation segmented there); its dense
    slot holds the carried fractions; the truth is the study's label on the objects asked for.

    Args:
        model: the model being trained (its encoder frozen: the studies' features are reused).
        volumes: the studies encoded along ``axis`` (`encode_volume`).
        images: the studies' (*spatial) images as read, for the slice-to-slice registrations.
        labels: their (*spatial) label maps.
        label_ids: the objects.
        axis: the slicing axis.
        drawn: slices taken as drawn per study.
        supports: supports per episode, as `propagate`'s.
    """

    def __init__(
        self,
        model: ProxyPromptSAM,
        volumes: Sequence[EncodedVolume],
        images: Sequence[Tensor],
        labels: Sequence[Tensor],
        label_ids: Sequence[int],
        axis: int,
        *,
        drawn: int = 3,
        supports: int = 3,
    ) -> None:
        if model.encoder_trains:
            raise ValueError("propagation episodes reuse the studies' encoder features: the encoder must be frozen")
        if not len(volumes) == len(images) == len(labels):
            raise ValueError(f"got {len(volumes)} volumes, {len(images)} images and {len(labels)} labels")
        self.volumes = list(volumes)
        self.grids = [model.to_grid(v.features.embed) for v in volumes]
        self.masks, self.carried, self.truth, self.items = [], [], [], []
        for s, (volume, image, label) in enumerate(zip(volumes, images, labels, strict=True)):
            lab = as_slices(label[None], axis)[:, 0]
            truth = torch.stack([lab == i for i in label_ids], dim=1).float()  # (Z, N, H, W)
            zs = drawn_positions(label, axis, drawn)
            chained = carry_between(as_slices(image[None], axis)[:, 0].numpy(), {z: truth[z].numpy() for z in zs})
            carried = in_frame(model, torch.from_numpy(chained).clamp(0, 1), volume.size)
            framed = (in_frame(model, truth, volume.size) > 0.5).float()
            masks = framed.clone()
            far = [z for z in range(len(volume)) if z not in zs]
            masks[far] = (carried[far] > 0.5).float()  # what propagation would have drawn there, roughly
            self.masks.append(masks)
            self.carried.append(carried)
            self.truth.append(framed)
            distance = {z: min(abs(z - d) for d in zs) for z in range(len(volume))}
            for z in far:
                if not bool((carried[z].flatten(1).amax(1) >= 0.5).any()):
                    continue
                before = [y for y in range(len(volume)) if distance[y] < distance[z]]
                near = sorted(before, key=lambda y: (abs(y - z), y))[:supports]
                self.items.append((s, z, near))
        if not self.items:
            raise ValueError("the carried masks ask for no object on any slice: check the labels and label ids")

    def __len__(self) -> int:
        return len(self.items)

    def logits(self, model: ProxyPromptSAM, item: int) -> tuple[Tensor, Tensor]:
        """Episode ``item`` -> (low-res logits, truth), both (1, n, h, w) over the n objects the carried masks ask
        for."""
        s, z, near = self.items[item]
        device = model.backbone.device
        volume = self.volumes[s]
        emb = model.encode_prepared_support(
            volume.x[near].to(device), self.masks[s][near].to(device), Features(self.grids[s][near].to(device))
        )
        f = volume.features.select([z]).to(device)
        return prior_episode(model, f, model.select(f, emb), self.carried[s][z : z + 1], self.truth[s][z : z + 1])
