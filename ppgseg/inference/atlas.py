"""Labelled studies registered onto a target volume with SimpleITK, and their labels fused: the classical multi-atlas
segmentation, the prior of the registration prompt, and the alignment that puts each labelled slice at its
anatomical position in the target (per-slice supports)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter
from torch import Tensor


def to_sitk(volume: Tensor | np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> sitk.Image:
    """A (X, Y, Z) array as MONAI's readers give it -> a float32 SimpleITK image with ``spacing`` (x, y, z)."""
    a = volume.detach().cpu().numpy() if isinstance(volume, Tensor) else np.asarray(volume)
    if a.ndim != 3:
        raise ValueError(f"expected a 3D (X, Y, Z) volume, got shape {a.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)).astype(np.float32))
    image.SetSpacing([float(s) for s in spacing])
    return image


def from_sitk(image: sitk.Image) -> np.ndarray:
    """A SimpleITK image -> its (X, Y, Z) array."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


@dataclass
class Registered:
    """One labelled study brought onto the target: its labels resampled as one-hot fractions (N, X, Y, Z) in the
    target's grid, and the transform that maps a target point (x, y, z, physical) to the study's."""

    fractions: np.ndarray
    transform: sitk.Transform
    weight: np.ndarray | None = None  # (X, Y, Z) local similarity to the target, for weighted fusion (None: equal)


class AtlasRegistration:
    """Register labelled studies (atlases) onto a target and fuse their labels.

    Each atlas is aligned by an affine transform (centred by image moments, then Mattes mutual information with a
    regular-step gradient descent over two resolutions) and, with ``deformable``, by diffeomorphic demons on the
    affinely resampled, histogram-matched image. Its labels go through both as one-hot masks with linear
    interpolation. The fused label is the (plurality) vote of the atlases, background included: each atlas counts
    once (``fusion="majority"``), or at each voxel by how well its registered image matches the target there
    (``fusion="local"``, locally weighted voting: the inverse of the Gaussian-smoothed squared intensity difference,
    intensities scaled between their 1st and 99th percentiles).

    Args:
        deformable: add the demons stage after the affine one.
        fusion: "majority" or "local".
        local_sigma: standard deviation (voxels) of the neighbourhood of the local weights.
        affine_iterations: gradient-descent iterations per resolution.
        demons_iterations: demons iterations.
        demons_smoothing: standard deviation (voxels) of the demons displacement smoothing.
    """

    def __init__(
        self,
        *,
        deformable: bool = True,
        affine_iterations: int = 100,
        demons_iterations: int = 50,
        demons_smoothing: float = 1.5,
        fusion: str = "local",
        local_sigma: float = 1.0,
    ) -> None:
        if affine_iterations < 1 or demons_iterations < 1:
            raise ValueError("affine_iterations and demons_iterations must be >= 1")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion, self.local_sigma = fusion, local_sigma
        self.deformable = deformable
        self.affine_iterations, self.demons_iterations = affine_iterations, demons_iterations
        self.demons_smoothing = demons_smoothing

    def affine(self, fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
        """The affine transform mapping ``fixed`` points to ``moving`` points."""
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsGradientDescent(
            learningRate=1.0,
            numberOfIterations=self.affine_iterations,
            convergenceMinimumValue=1e-6,
            convergenceWindowSize=10,
            estimateLearningRate=method.EachIteration,
            maximumStepSizeInPhysicalUnits=1.0,
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([2, 1])
        method.SetSmoothingSigmasPerLevel([1.0, 0.0])
        start = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        method.SetInitialTransform(start, inPlace=False)
        return method.Execute(fixed, moving)

    def register(
        self, fixed: sitk.Image, moving: sitk.Image, label: np.ndarray, label_ids: Sequence[int]
    ) -> Registered:
        """One atlas (``moving`` with its (X, Y, Z) ``label`` map) onto ``fixed``."""
        target, atlas = fixed, moving
        fixed, moving = (sitk.RescaleIntensity(i, 0.0, 1.0) for i in (fixed, moving))
        transform: sitk.Transform = self.affine(fixed, moving)
        if self.deformable:
            moved = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0)
            moved = sitk.HistogramMatching(moved, fixed, numberOfHistogramLevels=64, numberOfMatchPoints=7)
            demons = sitk.DiffeomorphicDemonsRegistrationFilter()
            demons.SetNumberOfIterations(self.demons_iterations)
            demons.SetSmoothDisplacementField(True)
            demons.SetStandardDeviations(self.demons_smoothing)
            field = demons.Execute(fixed, moved)  # fixed point p -> moved point p + d(p)
            transform = sitk.CompositeTransform([transform, sitk.DisplacementFieldTransform(field)])
        fractions = []
        for i in label_ids:
            one = to_sitk((label == i).astype(np.float32), moving.GetSpacing())
            fractions.append(from_sitk(sitk.Resample(one, fixed, transform, sitk.sitkLinear, 0.0)))
        weight = None
        if self.fusion == "local":
            moved = from_sitk(sitk.Resample(atlas, target, transform, sitk.sitkLinear, 0.0))
            difference = (robust_unit(moved) - robust_unit(from_sitk(target))) ** 2
            weight = 1.0 / (gaussian_filter(difference, self.local_sigma) + 1e-3)
        return Registered(np.stack(fractions), transform, weight)

    def __call__(
        self,
        target: Tensor,
        atlases: Sequence[tuple[Tensor, Tensor]],
        label_ids: Sequence[int],
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> tuple[Tensor, list[Registered]]:
        """(X, Y, Z) target and (image, label map) atlases, all (X, Y, Z) -> the fused label map (uint8 ids, target
        grid) and each atlas as registered."""
        if not atlases:
            raise ValueError("atlases is empty: give at least one labelled study")
        fixed = to_sitk(target, spacing)
        done = [self.register(fixed, to_sitk(img, spacing), np.asarray(lab), label_ids) for img, lab in atlases]
        return fuse(done, label_ids), done


FUSIONS = ("majority", "local")


def robust_unit(a: np.ndarray) -> np.ndarray:
    """Intensities scaled so that their 1st and 99th percentiles are 0 and 1, clipped to [0, 1]."""
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / max(hi - lo, 1e-8), 0, 1)


def vote(registered: Sequence[Registered]) -> np.ndarray:
    """The atlases' vote (N, X, Y, Z) as shares in [0, 1]: each atlas votes for the label with the largest fraction
    at a voxel (background where all are below a half), with equal weight or, where its registration has one, its
    local weight."""
    votes, weights = [], []
    for r in registered:
        f = r.fractions
        winner = np.where(f.max(0) >= 0.5, f.argmax(0), -1)
        votes.append(np.stack([winner == n for n in range(len(f))]).astype(np.float32))
        weights.append(np.ones(f.shape[1:], np.float32) if r.weight is None else r.weight.astype(np.float32))
    total = np.sum(weights, axis=0)
    return (np.sum([w * v for w, v in zip(weights, votes, strict=True)], axis=0) / total).astype(np.float32)


def fuse(registered: Sequence[Registered], label_ids: Sequence[int]) -> Tensor:
    """The fused label map: at each voxel the label with the largest vote (`vote`), background where its share
    outweighs each label's."""
    v = vote(registered)
    background = 1.0 - v.sum(0)
    ids = np.array([0, *label_ids], dtype=np.uint8)
    return torch.from_numpy(ids[np.concatenate([background[None], v]).argmax(0)])


def atlas_slice(
    registered: Registered, target_shape: Sequence[int], axis: int, z: int, spacing=(1.0, 1.0, 1.0), atlas_spacing=None
) -> int:
    """The index, along ``axis`` of the atlas (voxel ``atlas_spacing``, default the target's ``spacing``), of the point
    the registration maps the centre of target slice ``z`` to (rounded; may fall outside the atlas)."""
    centre = [(n - 1) / 2 * s for n, s in zip(target_shape, spacing, strict=True)]
    centre[axis] = z * spacing[axis]
    step = (atlas_spacing or spacing)[axis]
    return round(registered.transform.TransformPoint(centre)[axis] / step)


def warp_to_slice(moving: np.ndarray, fixed: np.ndarray, masks: np.ndarray, *, iterations: int = 30) -> np.ndarray:
    """(N, H, W) ``masks`` of the (H, W) slice ``moving`` carried onto the neighbouring slice ``fixed`` by 2D
    diffeomorphic demons (after histogram matching), as fractions: how an object's outline moves from one slice to
    the next, what copying it leaves out."""
    f, m = (sitk.RescaleIntensity(sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32)), 0.0, 1.0)
            for a in (fixed, moving))  # fmt: skip
    m = sitk.HistogramMatching(m, f, numberOfHistogramLevels=64, numberOfMatchPoints=7)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(1.5)
    transform = sitk.DisplacementFieldTransform(demons.Execute(f, m))
    out = []
    for mask in masks:
        one = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.float32))
        out.append(sitk.GetArrayFromImage(sitk.Resample(one, f, transform, sitk.sitkLinear, 0.0)))
    return np.stack(out)


def carry_between(slices: np.ndarray, drawn: dict[int, np.ndarray]) -> np.ndarray:
    """(Z, N, H, W) fractions: the (N, H, W) masks of the ``drawn`` slices carried to every slice of the (Z, H, W)
    ``slices`` by chains of `warp_to_slice`, one slice a step. Between two drawn slices the chains from both ends are
    mixed by distance (the nearer end weighs more: an object drawn on one and absent from the other ends halfway);
    beyond the outermost drawn slice on each side, its own chain. Fractions are carried, never thresholded on the
    way, so an outline that thins is not cut at each step."""
    if not drawn:
        raise ValueError("drawn is empty: give at least one drawn slice")
    keys = sorted(drawn)
    out = np.zeros((len(slices), *np.shape(drawn[keys[0]])), dtype=np.float32)
    for z in keys:
        out[z] = drawn[z]
    for start, stop in ((keys[0], -1), (keys[-1], len(slices))):
        for z, masks in _chain(slices, start, stop, drawn[start]).items():
            out[z] = masks
    for a, b in zip(keys, keys[1:], strict=False):
        up, down = _chain(slices, a, b, drawn[a]), _chain(slices, b, a, drawn[b])
        for z in range(a + 1, b):
            w = (z - a) / (b - a)
            out[z] = (1 - w) * up[z] + w * down[z]
    return out


def _chain(slices: np.ndarray, start: int, stop: int, masks: np.ndarray) -> dict[int, np.ndarray]:
    """Slice index -> ``masks`` of slice ``start`` carried there step by step, for the slices from ``start`` towards
    ``stop`` (both excluded)."""
    step = 1 if stop > start else -1
    out, current = {}, np.asarray(masks, dtype=np.float32)
    for z in range(start + step, stop, step):
        if current.max(initial=0) > 0.5:  # below a half nowhere: nothing left to carry
            current = warp_to_slice(slices[z - step], slices[z], current)
        out[z] = current
    return out
