"""Volumes segmented slice by slice with supports that change with the slice: labelled slices taken at the target
slice's anatomical position, a registered atlas label as the carried masks (the registration prompt), and
propagation outward from slices a user drew, each next slice prompted by its nearest labelled neighbours."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.transforms import KeepLargestConnectedComponent
from torch import Tensor

from ..backbones.base import Features
from ..data.intensity import to_byte_range
from ..io import voxel_spacing
from ..lora import merged_lora
from ..modeling.generator import Selected, SupportEmbedding
from ..modeling.proxy_sam import ProxyPromptSAM
from .atlas import AtlasRegistration, Registered, atlas_slice, carry_between, to_sitk, vote
from .slices import as_slices, encode_slices, to_label


def byte_volume(image: Tensor) -> Tensor:
    """A volume (C, *spatial) in [0, 255] with one scale for all its slices (0.5 and 99.5 percentiles), so that a
    slice's contrast does not depend on what else it shows (slice-wise min-max does)."""
    x = image.float()
    sample = x.flatten()[:: max(1, x.numel() // 200_000)]
    lo, hi = torch.quantile(sample, 0.005), torch.quantile(sample, 0.995)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1) * 255


@dataclass
class EncodedVolume:
    """A volume's slices along ``axis`` as the model reads them: encoder input ``x`` (Z, 3, S, S), features,
    unit-norm pooled feature ``vectors`` (Z, C) and the slices' size."""

    x: Tensor
    features: Features
    vectors: Tensor
    size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.x)


def encode_volume(model: ProxyPromptSAM, image: Tensor, axis: int) -> EncodedVolume:
    """Encode every slice of a (C, *spatial) volume along ``axis`` (`byte_volume` intensities)."""
    slices = as_slices(byte_volume(image), axis)
    xs, parts = [], []
    for s in slices:
        x, _ = model.backbone.preprocess(s.expand(3, -1, -1)[None] if s.shape[0] == 1 else s[None, :3])
        xs.append(x.cpu())
        parts.append(model.encode_images(x).to("cpu"))
    features = Features.cat(parts)
    vectors = F.normalize(features.embed.mean(dim=(2, 3)), dim=1)
    return EncodedVolume(torch.cat(xs), features, vectors, tuple(slices.shape[-2:]))


def encoded_slices(model: ProxyPromptSAM, image: Tensor, axis: int, features: Features | None = None) -> EncodedVolume:
    """Every slice of a (C, *spatial) volume along ``axis`` as `segment_image` reads it (each slice scaled to its own
    byte range), with its encoder ``features`` computed ahead (`encode_slices`, a service's cache) or now."""
    slices = as_slices(image, axis)
    if features is None:
        features = encode_slices(model, image, axis)
    if len(features.embed) != len(slices):
        raise ValueError(f"features of {len(features.embed)} slices for a volume of {len(slices)} slices")
    x = torch.cat([model.backbone.preprocess(to_byte_range(s)[None])[0].cpu() for s in slices])
    vectors = F.normalize(features.embed.mean(dim=(2, 3)), dim=1)
    return EncodedVolume(x, features, vectors, tuple(slices.shape[-2:]))


def in_frame(model: ProxyPromptSAM, masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(Z, N, H, W) masks or fractions on slices of ``size`` -> (Z, N, S, S) in the encoder's frame (kept soft)."""
    geo = model.backbone.geometry(size)
    m = F.interpolate(masks.float(), size=geo.resized, mode="bilinear", align_corners=False)
    s = model.backbone.img_size
    return F.pad(m, (0, s - geo.resized[1], 0, s - geo.resized[0]))


@dataclass
class LabelledSlices:
    """The slices of labelled studies, encoded once: encoder input ``x`` (M, 3, S, S), ``masks`` (M, N, S, S) in the
    encoder frame, features on the PPG grid ``grid`` (M, C, g, g), pooled ``vectors`` (M, C), and each row's
    ``study`` and slice ``index``."""

    x: Tensor
    masks: Tensor
    grid: Tensor
    vectors: Tensor
    study: Tensor
    index: Tensor

    @staticmethod
    def of(model: ProxyPromptSAM, volume: EncodedVolume, label: Tensor, label_ids: Sequence[int], axis: int, study=0):
        """The labelled slices of one study: ``volume`` encoded, ``label`` its (*spatial) label map."""
        lab = as_slices(label[None], axis)[:, 0]
        masks = torch.stack([lab == i for i in label_ids], dim=1)
        z = len(volume)
        return LabelledSlices(
            volume.x, (in_frame(model, masks, volume.size) > 0.5).float(), model.to_grid(volume.features.embed),
            volume.vectors, torch.full((z,), study), torch.arange(z),
        )  # fmt: skip

    @staticmethod
    def cat(parts: Sequence[LabelledSlices]) -> LabelledSlices:
        return LabelledSlices(*(torch.cat(f) for f in zip(*(vars(p).values() for p in parts), strict=True)))

    def embedding(self, model: ProxyPromptSAM, rows: Sequence[int]) -> SupportEmbedding:
        rows = list(rows)
        device = model.backbone.device
        return model.encode_prepared_support(
            self.x[rows].to(device), self.masks[rows].to(device), Features(self.grid[rows].to(device))
        )


def position_supports(
    bank: LabelledSlices, at: Tensor, vectors: Tensor, *, window: int = 2, count: int = 4
) -> list[list[int]]:
    """For each target slice, the rows of ``bank`` to prompt it with.

    ``at`` (Z, K): the slice of labelled study k at target slice z's anatomical position (from the alignment of the
    study to the target). Candidates are the study's slices within ``window`` of it; they are ranked by the cosine of
    their pooled encoder features with the target slice's (``vectors`` (Z, C)) and taken in turns over the studies
    (each study's best, then each one's second best...), ``count`` in all. A target slice no study reaches gets none.
    """
    out = []
    for z in range(len(at)):
        near = (bank.index - at[z, bank.study]).abs() <= window
        rows = near.nonzero()[:, 0]
        order = rows[(bank.vectors[rows] @ vectors[z]).argsort(descending=True)].tolist()
        turn, seen = {}, {}
        for r in order:  # rank within its study
            s = int(bank.study[r])
            turn[r] = seen.get(s, 0)
            seen[s] = turn[r] + 1
        out.append(sorted(order, key=lambda r: turn[r])[:count])  # stable: similarity order within a turn
    return out


def decode_with_prior(
    model: ProxyPromptSAM, features: Features, selected: Selected, prior: Tensor, asked: Tensor
) -> tuple[Tensor, Tensor]:
    """`ProxyPromptSAM.decode` with ``prior`` (B, N, S, S) fractions in the encoder frame in the dense slot, in place
    of the masks the Selective map carries; P comes from the Selective map's own reading. Routes without a dense slot
    (P alone) do not read it."""
    return model.decode_kept(features, model.tokens(selected, asked), prior, asked)


def blended(logits: Tensor, prior: Tensor, blend: float) -> Tensor:
    """Decoder ``logits`` (B, N, H, W) and ``prior`` fractions of the same shape -> the logits of their mixture
    ``(1 - blend) * sigmoid(logits) + blend * prior``: the prior votes beside the decoder (0: the decoder alone)."""
    if blend <= 0:
        return logits
    p = (1 - blend) * torch.sigmoid(logits) + blend * prior.float()
    return torch.logit(p.clamp(1e-4, 1 - 1e-4))


def segment_slices(
    model: ProxyPromptSAM,
    volume: EncodedVolume,
    bank: LabelledSlices,
    supports: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    *,
    prior: Tensor | None = None,
    blend: float = 0.5,
    min_carried: float = 0.05,
) -> Tensor:
    """(Z, H, W) label map: slice z prompted by the bank rows ``supports[z]`` (none: background).

    ``prior`` (Z, N, H, W) fractions in [0, 1] (a registered atlas label): the registration prompt. It replaces the
    masks the Selective map carries from the supports, in the decoder's dense slot, so that the PPG's P and the
    decoder refine it; the decoder's probability is then mixed with the prior's (`blended`, weight ``blend``). An
    object the prior leaves below a half on a slice is background there. Without a prior, an object carried below
    ``min_carried`` everywhere on a slice is background there.
    """
    out = torch.zeros((len(volume), *volume.size), dtype=torch.uint8)
    framed = None if prior is None else in_frame(model, prior, volume.size)
    geo = model.backbone.geometry(volume.size)
    device = model.backbone.device
    with torch.no_grad(), merged_lora(model):
        for z, rows in enumerate(supports):
            if not rows:
                continue
            f = volume.features.select([z]).to(device)
            selected = model.select(f, bank.embedding(model, rows))
            if framed is None:
                asked = selected.carried(min_carried)
                if not bool(asked.any()):
                    continue
                low, _ = model.decode(f, selected, asked)
            else:
                carried = framed[z : z + 1].to(device)
                asked = carried.flatten(2).amax(2) >= 0.5
                if not bool(asked.any()):
                    continue
                low, _ = decode_with_prior(model, f, selected, carried, asked)
            logits = model.backbone.postprocess(low, geo).cpu()
            if prior is not None:
                logits = blended(logits, prior[z : z + 1], blend) * asked.cpu()[..., None, None]
            out[z] = to_label(logits, label_ids)[0]
    return out


def segment_registered(
    model: ProxyPromptSAM,
    volume: EncodedVolume,
    bank: LabelledSlices,
    registered: Sequence[Registered],
    label_ids: Sequence[int],
    axis: int,
    *,
    shape: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    atlas_spacings: Sequence[Sequence[float]] | None = None,
    prompt: bool = True,
    blend: float = 0.5,
) -> Tensor:
    """(Z, H, W) label map of a (*``shape``) volume from labelled studies registered onto it: ``bank`` holds their
    slices (study k = ``registered[k]``). Each target slice is prompted by the slices at its position in each study
    (`position_supports`); with ``prompt`` the atlases' mean vote is the registration prompt (`segment_slices`)."""
    spacings = atlas_spacings or [spacing] * len(registered)
    at = torch.tensor(
        [[atlas_slice(r, shape, axis, z, spacing, s) for r, s in zip(registered, spacings, strict=True)]
         for z in range(len(volume))]
    )  # fmt: skip
    supports = position_supports(bank, at, volume.vectors)
    prior = None
    if prompt:
        prior = as_slices(torch.from_numpy(vote(registered)), axis)  # (Z, N, H, W)
    return segment_slices(model, volume, bank, supports, label_ids, prior=prior, blend=blend)


@dataclass
class Atlas:
    """A labelled study for the registration route: ``image`` (C, *spatial) as read, its ``label`` map (*spatial)
    and its slices ``encoded`` once (`encoded_slices`)."""

    image: Tensor
    label: Tensor
    encoded: EncodedVolume


def register_atlases(
    registration: AtlasRegistration, image: Tensor, atlases: Sequence[Atlas], label_ids: Sequence[int]
) -> list[Registered]:
    """Each of ``atlases`` registered onto the volume ``image`` (C, *spatial), each with its voxel spacing."""
    fixed = to_sitk(image[0], voxel_spacing(image))
    return [
        registration.register(fixed, to_sitk(a.image[0], voxel_spacing(a.image)), a.label.numpy(), label_ids)
        for a in atlases
    ]


def segment_atlases(
    model: ProxyPromptSAM,
    image: Tensor,
    volume: EncodedVolume,
    atlases: Sequence[Atlas],
    registered: Sequence[Registered],
    label_ids: Sequence[int],
    axis: int,
) -> Tensor:
    """(Z, H, W) label map of the volume ``image`` (its slices ``volume``) from ``atlases`` as ``registered`` onto
    it (`segment_registered`, the registration prompt on)."""
    bank = LabelledSlices.cat(
        [LabelledSlices.of(model, a.encoded, a.label, label_ids, axis, study=k) for k, a in enumerate(atlases)]
    )
    return segment_registered(
        model, volume, bank, registered, label_ids, axis, shape=image.shape[1:], spacing=voxel_spacing(image),
        atlas_spacings=[voxel_spacing(a.image) for a in atlases],
    )  # fmt: skip


def propagate(
    model: ProxyPromptSAM,
    volume: EncodedVolume,
    drawn: dict[int, Tensor],
    label_ids: Sequence[int],
    *,
    supports: int = 3,
    min_iou: float = 0.5,
    blend: float = 0.5,
    slices: Tensor | None = None,
) -> Tensor:
    """(Z, H, W) label map of a volume from a few slices drawn in it: ``drawn`` maps slice index -> (H, W) label
    map (all-zero: the object is not there).

    Slices are taken in order of their distance to the nearest drawn slice. Each is prompted by its ``supports``
    nearest labelled slices (drawn or segmented before it) and a carried mask in the decoder's dense slot (the
    registration prompt with the drawn slices as the atlas), mixed with the decoder's result with weight ``blend``.
    With ``slices`` (Z, H, W), the volume's slices as read, the carried masks are the drawn ones brought to the slice
    by chains of 2D registrations from both sides (`carry_between`, fractions); without, the nearest labelled
    slice's masks, copied. Beyond the outermost drawn slice on either side, an object stops where its mask comes back
    empty or with a predicted IoU below ``min_iou``: no slice further out gets it.
    """
    if not drawn:
        raise ValueError("drawn is empty: give at least one drawn slice")
    z_all = len(volume)
    bad = [z for z in drawn if not 0 <= z < z_all]
    if bad:
        raise ValueError(f"drawn slice(s) {bad} outside the volume's {z_all} slices")
    n = len(label_ids)
    labels = {z: torch.stack([lab == i for i in label_ids]).float() for z, lab in drawn.items()}  # (N, H, W)
    lo, hi = min(drawn), max(drawn)
    ended = torch.zeros(2, n, dtype=torch.bool)  # below lo, above hi
    grid = model.to_grid(volume.features.embed)
    geo = model.backbone.geometry(volume.size)
    device = model.backbone.device
    order = outward(drawn, z_all)
    chained = None
    if slices is not None:
        chained = torch.from_numpy(carry_between(slices.numpy(), {z: m.numpy() for z, m in labels.items()}))
    with torch.no_grad(), merged_lora(model):
        for z in order:
            side = 0 if z < lo else 1 if z > hi else None
            active = ~ended[side] if side is not None else torch.ones(n, dtype=torch.bool)
            near = sorted(labels, key=lambda d: (abs(d - z), d))[:supports]
            masks = in_frame(model, torch.stack([labels[d] for d in near]), volume.size)
            carried = labels[near[0]] if chained is None else chained[z].clamp(0, 1)
            emb = model.encode_prepared_support(
                volume.x[near].to(device), (masks > 0.5).float().to(device), Features(grid[near].to(device))
            )
            f = volume.features.select([z]).to(device)
            prior = in_frame(model, carried[None], volume.size).to(device)
            asked = active.to(device)[None] & (prior.flatten(2).amax(2) > 0.5)
            low, iou = decode_with_prior(model, f, model.select(f, emb), prior, asked)
            logits = blended(model.backbone.postprocess(low, geo).cpu(), carried[None], blend)
            found = (logits[0] > 0).float()  # (N, H, W)
            keep = asked[0].cpu() & (found.flatten(1).sum(1) > 0) & (iou[0].cpu() >= min_iou)
            if side is not None:
                ended[side] |= active & ~keep
            labels[z] = found * keep[:, None, None]
    return to_label(torch.stack([labels[z] for z in range(z_all)]), label_ids)  # masks (Z, N, H, W) -> label map


def outward(drawn: Collection[int], z_all: int) -> list[int]:
    """The slices of a ``z_all``-slice volume not in ``drawn``, nearest to a drawn one first (the lower on a tie)."""
    return sorted((z for z in range(z_all) if z not in drawn), key=lambda z: (min(abs(z - d) for d in drawn), z))


def one_component(label: Tensor, label_ids: Sequence[int]) -> Tensor:
    """Each label kept to its largest 3D connected component (MONAI's `KeepLargestConnectedComponent`)."""
    keep = KeepLargestConnectedComponent(applied_labels=list(label_ids), independent=True, connectivity=3)
    return keep(label[None])[0].to(label.dtype)


def to_volume(slices: Tensor, axis: int) -> Tensor:
    """(Z, H, W) per-slice labels -> the (*spatial) label map of the volume they were cut from along ``axis``."""
    return slices.movedim(0, axis)
