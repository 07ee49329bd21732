"""Generated demo data in the project's data contract: fundus-like, ultrasound-like and CT-like subjects.

Subjects differ in shape, position, size, contrast and noise, so one subject's masks are a real support for
another's. Everything is drawn from one seed; nothing is downloaded. Label maps are integer maps whose values are
disjoint objects (so the fundus "optic_disc" is the neuro-retinal rim around the cup, and vessels are drawn over both).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

FAMILIES = {
    "fundus": {"1": "optic_disc", "2": "optic_cup", "3": "vessel"},
    "ultrasound": {"1": "pubic_symphysis", "2": "fetal_head"},
    "ct": {"1": "liver", "2": "spleen", "3": "kidney"},
}


def _blur(rng: np.random.Generator, shape: tuple[int, ...], scale: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: coarse noise upsampled with nearest repeat and box-smoothed."""
    coarse = rng.uniform(-1, 1, size=tuple(s // scale + 1 for s in shape))
    big = coarse
    for axis in range(len(shape)):
        big = np.repeat(big, scale, axis=axis)
    big = big[tuple(slice(0, s) for s in shape)]
    for axis in range(len(shape)):
        kernel = np.ones(min(scale, shape[axis])) / min(scale, shape[axis])  # never longer than the axis
        big = np.apply_along_axis(lambda v, k=kernel: np.convolve(v, k, mode="same"), axis, big)
    return big


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    return ((c * x + s * y) / rx) ** 2 + ((-s * x + c * y) / ry) ** 2 <= 1


def fundus(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """RGB fundus-like image (H, W, 3) uint8 and label map (H, W): 1 disc rim, 2 cup, 3 vessels.

    The view is a region of interest around the optic disc, as disc/cup segmentation works on (REFUGE-style crops):
    the disc spans about a third of the image, vessels leave it towards the border.
    """
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    field = np.ones((size, size), bool)
    cy, cx = rng.uniform(0.4, 0.6) * size, rng.uniform(0.4, 0.6) * size
    rd = rng.uniform(0.15, 0.2) * size
    disc = _ellipse(yy, xx, cy, cx, rd * rng.uniform(1.0, 1.15), rd, rng.uniform(-0.3, 0.3))
    cup = _ellipse(
        yy,
        xx,
        cy + rng.uniform(-0.1, 0.1) * rd,
        cx + rng.uniform(-0.1, 0.1) * rd,
        rd * rng.uniform(0.35, 0.6),
        rd * rng.uniform(0.35, 0.55),
    )
    vessels = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(5, 8))):  # branching random walks leaving the disc
        stack = [(cy, cx, rng.uniform(0, 2 * np.pi), rng.uniform(5.0, 7.5), 0)]
        while stack:
            y, x, theta, width, depth = stack.pop()
            step = max(1.0, 0.5 * width)  # steps shorter than the width: a continuous vessel
            for _step in range(int(rng.integers(50, 90) / step)):
                theta += rng.normal(0, 0.12) * np.sqrt(step / 4)
                y, x = y + step * np.sin(theta), x + step * np.cos(theta)
                if not (0 <= y < size and 0 <= x < size):
                    break
                vessels |= (yy - y) ** 2 + (xx - x) ** 2 <= (width / 2) ** 2
            if depth < 2 and width > 3:
                stack += [(y, x, theta + s * rng.uniform(0.3, 0.7), width * 0.7, depth + 1) for s in (-1, 1)]
    vessels &= field & ~_ellipse(yy, xx, cy, cx, 0.5 * rd, 0.5 * rd)
    label = np.zeros((size, size), np.uint8)
    label[disc] = 1
    label[cup] = 2
    label[vessels] = 3
    label[~field] = 0

    shade = 1 - 0.25 * (((yy - cy) ** 2 + (xx - cx) ** 2) / (0.7 * size) ** 2)
    base = np.array([rng.uniform(150, 200), rng.uniform(60, 90), rng.uniform(20, 40)])
    img = base[None, None] * (shade * (1 + 0.08 * _blur(rng, (size, size), 16)))[..., None]
    img[disc] = img[disc] * 0.4 + np.array([245, 200, 140]) * 0.6
    img[cup] = img[cup] * 0.3 + np.array([255, 240, 210]) * 0.7
    img[vessels] *= rng.uniform(0.45, 0.6)
    img[~field] = 0
    img += rng.normal(0, rng.uniform(2, 6), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def ultrasound(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Grey intrapartum-ultrasound-like image (H, W) uint8 with speckle; labels 1 pubic symphysis, 2 fetal head."""
    shapes = _ultrasound_shapes(rng, size)
    field = _blur(rng, (size, size), 24)
    levels = rng.uniform(35, 55), rng.uniform(170, 210), rng.uniform(150, 190)  # head, skull, symphysis
    return _ultrasound_frame(rng, shapes, field, levels, size)


def ultrasound_video(rng: np.random.Generator, frames: int = 20, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """An intrapartum-ultrasound-like clip (F, H, W) uint8 and labels (F, H, W): one subject whose fetal head descends
    and turns across the frames (the symphysis stays), with fresh speckle in every frame."""
    shapes = _ultrasound_shapes(rng, size)
    field = _blur(rng, (size, size), 24)
    levels = rng.uniform(35, 55), rng.uniform(170, 210), rng.uniform(150, 190)
    travel = rng.uniform(0.06, 0.12) * size * np.array([1.0, rng.uniform(-0.5, 0.5)])  # down, a little sideways
    turn = rng.uniform(-0.3, 0.3)
    images, labels = [], []
    for f in range(frames):
        t = f / max(frames - 1, 1)
        moved = {**shapes, "fh_c": tuple(np.array(shapes["fh_c"]) + t * travel), "angle": shapes["angle"] + t * turn}
        image, label = _ultrasound_frame(rng, moved, field, levels, size)
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels)


def _ultrasound_shapes(rng: np.random.Generator, size: int) -> dict:
    return {
        "fh_c": (rng.uniform(0.55, 0.7) * size, rng.uniform(0.45, 0.62) * size),
        "fh_r": (rng.uniform(0.2, 0.27) * size, rng.uniform(0.24, 0.32) * size),
        "angle": rng.uniform(-0.5, 0.5),
        "ps": (
            rng.uniform(0.22, 0.32) * size,
            rng.uniform(0.3, 0.42) * size,
            rng.uniform(6, 9),
            rng.uniform(14, 22),
            rng.uniform(-0.8, -0.3),
        ),
    }


def _ultrasound_frame(
    rng: np.random.Generator, shapes: dict, field: np.ndarray, levels: tuple[float, float, float], size: int
) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    r, ang = np.hypot(yy + 0.1 * size, xx - size / 2), np.arctan2(xx - size / 2, yy + 0.1 * size)
    sector = (r < 1.05 * size) & (np.abs(ang) < 0.75)
    fh_c, fh_r, angle = shapes["fh_c"], shapes["fh_r"], shapes["angle"]
    head = _ellipse(yy, xx, *fh_c, *fh_r, angle)
    skull = head & ~_ellipse(yy, xx, *fh_c, fh_r[0] - 5, fh_r[1] - 5, angle)
    ps = _ellipse(yy, xx, *shapes["ps"])
    label = np.zeros((size, size), np.uint8)
    label[head] = 2
    label[ps & ~head] = 1

    tissue = 70 + 25 * field
    tissue[head], tissue[skull], tissue[ps] = levels
    speckle = rng.rayleigh(1.0, (size, size)) / np.sqrt(np.pi / 2)  # unit-mean multiplicative speckle
    img = tissue * speckle * (1 - 0.4 * r / size)
    img[~sector] = 0
    label[~sector] = 0
    return np.clip(img, 0, 255).astype(np.uint8), label


def ct_volume(rng: np.random.Generator, shape: tuple[int, int, int] = (96, 96, 24)) -> tuple[np.ndarray, np.ndarray]:
    """CT-like volume (X, Y, Z) float32 in HU and label map: 1 liver, 2 spleen, 3 kidney."""
    x, y, z = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    sx, sy, sz = shape

    size = np.array(shape, np.float32)

    def ellipsoid(centre, radius):
        """Centre and radii as fractions of the volume, each jittered by up to 10 %."""
        c = np.array(centre) * size * rng.uniform(0.9, 1.1, 3)
        r = np.array(radius) * size * rng.uniform(0.9, 1.1, 3)
        return ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1

    body = ((x - sx / 2) / (0.45 * sx)) ** 2 + ((y - sy / 2) / (0.36 * sy)) ** 2 <= 1
    liver = ellipsoid((0.33, 0.45, 0.55), (0.17, 0.2, 0.4))
    spleen = ellipsoid((0.72, 0.42, 0.6), (0.08, 0.1, 0.3))
    kidney = ellipsoid((0.62, 0.64, 0.4), (0.06, 0.08, 0.25))
    label = np.zeros(shape, np.uint8)
    label[liver & body] = 1
    label[spleen & body & (label == 0)] = 2
    label[kidney & body & (label == 0)] = 3
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40 + 15 * _blur(rng, shape, 8)[body]
    for value, mean in ((1, rng.uniform(90, 120)), (2, rng.uniform(50, 70)), (3, rng.uniform(140, 180))):
        hu[label == value] = mean
    hu += rng.normal(0, rng.uniform(8, 20), shape)
    return hu.astype(np.float32), label


def write_family(root: str | Path, family: str, *, n_train: int, n_val: int, n_test: int, seed: int = 0) -> Path:
    """Write one family as a data-contract folder (``dataset.json`` + imagesTr/labelsTr) and return its path."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    folder = Path(root) / family
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, sorted(FAMILIES).index(family)])
    splits: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    counts = {"training": n_train, "validation": n_val, "test": n_test}
    index = 0
    for split, count in counts.items():
        for _ in range(count):
            name = f"{family}_{index:03d}"
            index += 1
            if family == "ct":
                image, label = ct_volume(rng)
                affine = np.diag([1.5, 1.5, 3.0, 1.0])
                nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"{name}.nii.gz")
                nib.save(nib.Nifti1Image(label, affine), folder / "labels" / f"{name}.nii.gz")
                ext = ".nii.gz"
            else:
                image, label = fundus(rng) if family == "fundus" else ultrasound(rng)
                Image.fromarray(image).save(folder / "images" / f"{name}.png")
                Image.fromarray(label).save(folder / "labels" / f"{name}.png")
                ext = ".png"
            splits[split].append({"image": f"images/{name}{ext}", "label": f"labels/{name}{ext}"})
    labels = {"0": "background", **FAMILIES[family]}
    meta = {
        "name": f"ppgseg demo {family}",
        "description": "generated by ppgseg.data.demo",
        "labels": labels,
        "tensorImageSize": "3D" if family == "ct" else "2D",
        **splits,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def write_studies(
    folder: str | Path,
    *,
    n_studies: int,
    n_labelled: int,
    shape: tuple[int, int, int] = (96, 96, 24),
    seed: int = 0,
) -> Path:
    """CT-like studies in MONAI Label's local datastore layout: ``<folder>/ct_XXX.nii.gz`` with the first
    ``n_labelled`` labelled under ``labels/final/``; ``dataset.json`` names the labels (1 liver, 2 spleen, 3 kidney).
    """
    if not 0 <= n_labelled <= n_studies:
        raise ValueError(f"n_labelled must be in 0..n_studies ({n_studies}), got {n_labelled}")
    folder = Path(folder)
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    affine = np.diag([1.5, 1.5, 3.0, 1.0]) * np.array([256 / shape[0], 256 / shape[1], 1, 1])
    for index in range(n_studies):
        image, label = ct_volume(rng, shape)
        name = f"ct_{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), folder / name)
        if index < n_labelled:
            nib.save(nib.Nifti1Image(label, affine), folder / "labels" / "final" / name)
    meta = {"name": "ppgseg demo studies", "labels": {"0": "background", **FAMILIES["ct"]}}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder
