"""Procedurally generated segmentation tasks (domain randomisation), for weights that follow a support set instead of
remembering an object.

A *task* is a recipe drawn at random: one to four parts, each of a kind (a smooth blob, a part nested inside another
part, a thin branching curve of some width, several pieces at once), with its own intensity and texture, on a
background of its own. Every image of a task is a new draw of that recipe (new positions, sizes, curves), with noise,
blur, a bias field and a resolution change drawn per image. Supports and targets of an episode come from one task,
so the only way to segment "part 2" is to look at what the support masks call part 2. Written as data-contract
folders (one per task), they train with the project's episode banks like any other set. Deterministic for a seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

KINDS = ("blob", "nested", "thin", "several")


@dataclass(frozen=True)
class Part:
    """One labelled part of a task.

    kind: ``blob``, ``nested`` (inside part ``parent``), ``thin`` (a branching curve ``width`` pixels wide at 256
    pixels) or ``several`` (``count`` blobs). ``size``: radius as a fraction of the image side. ``mean``, ``texture``,
    ``scale``: intensity (0-255), the amplitude of its texture and the texture's grain in pixels.
    """

    kind: str
    size: float
    mean: float
    texture: float
    scale: int
    parent: int | None = None
    width: float = 0.0
    count: int = 1


@dataclass(frozen=True)
class TaskRecipe:
    """A task: its parts (label i + 1 is ``parts[i]``), background and per-image degradation ranges."""

    parts: tuple[Part, ...]
    background: float
    background_texture: float
    noise: float  # largest Gaussian noise std
    blur: float  # largest Gaussian blur sigma (pixels at 256)
    bias: float  # largest multiplicative bias-field amplitude
    low_res: float  # largest down-sampling factor before up-sampling back
    tint: tuple[float, float, float]

    def names(self) -> dict[str, str]:
        return {str(i + 1): f"part{i + 1}_{p.kind}" for i, p in enumerate(self.parts)}


def draw_recipe(rng: np.random.Generator, kinds: tuple[str, ...] | None = None) -> TaskRecipe:
    """A random task; ``kinds`` fixes the parts' kinds (``nested`` needs an earlier blob-like part)."""
    if kinds is None:
        drawn: list[str] = []
        for kind in rng.choice(KINDS, int(rng.integers(1, 5))):
            holder = any(k in ("blob", "nested") for k in drawn)
            drawn.append(str(kind) if kind != "nested" or holder else "blob")  # nothing to nest in yet: a blob
        kinds = tuple(drawn)
    background = float(rng.uniform(30, 200))
    used = [background]
    parts = []
    for i, kind in enumerate(kinds):
        if kind not in KINDS:
            raise ValueError(f"part kind must be one of {KINDS}, got {kind!r}")
        parent = None
        if kind == "nested":
            holders = [j for j, p in enumerate(parts) if p.kind in ("blob", "nested")]
            if not holders:
                raise ValueError(f"part {i} is nested but no earlier part is a blob to nest it in: {kinds}")
            parent = int(rng.choice(holders))
        mean = _distinct(rng, used)
        used.append(mean)
        size = {"blob": rng.uniform(0.12, 0.3), "nested": rng.uniform(0.35, 0.6), "several": rng.uniform(0.04, 0.08)}
        parts.append(
            Part(
                kind=kind,
                size=float(size.get(kind, 0.0)),
                mean=mean,
                texture=float(rng.uniform(0, 20)),
                scale=int(rng.integers(4, 32)),
                parent=parent,
                width=float(rng.uniform(1.5, 6)) if kind == "thin" else 0.0,
                count=int(rng.integers(2, 6)) if kind == "several" else 1,
            )
        )
    return TaskRecipe(
        parts=tuple(parts),
        background=background,
        background_texture=float(rng.uniform(0, 25)),
        noise=float(rng.uniform(2, 20)),
        blur=float(rng.uniform(0, 1.5)),
        bias=float(rng.uniform(0, 0.3)),
        low_res=float(rng.uniform(1, 2.5)),
        tint=tuple(float(t) for t in (rng.uniform(0.7, 1.3, 3) if rng.random() < 0.5 else np.ones(3))),
    )


def _distinct(rng: np.random.Generator, used: list[float], gap: float = 30.0) -> float:
    """An intensity at least ``gap`` from every one in ``used`` (so each part is visible), where one exists."""
    for _ in range(100):
        value = float(rng.uniform(10, 245))
        if all(abs(value - u) >= gap for u in used):
            return value
    return float(rng.uniform(10, 245))


def draw_image(recipe: TaskRecipe, rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One image of a task.

    Returns:
        image: (3, size, size) uint8.  label: (size, size) uint8, 0 background, i + 1 for ``recipe.parts[i]``; every
        part shows (drawn again until it does).
    """
    for _ in range(50):
        label = _label_map(recipe, rng, size)
        if all((label == i + 1).any() for i in range(len(recipe.parts))):
            return _render(recipe, label, rng), label
    raise RuntimeError(f"could not draw every part of {recipe} at size {size}")


def _label_map(recipe: TaskRecipe, rng: np.random.Generator, size: int) -> np.ndarray:
    label = np.zeros((size, size), np.uint8)
    masks: list[np.ndarray] = []
    for i, part in enumerate(recipe.parts):
        if part.kind == "blob":
            mask = _blob(rng, size, rng.uniform(0.2, 0.8, 2) * size, part.size * size * rng.uniform(0.8, 1.2))
        elif part.kind == "nested":
            holder = ndimage.binary_erosion(masks[part.parent], iterations=2)
            mask = np.zeros_like(holder)
            if holder.any():
                ys, xs = np.nonzero(holder)
                k = int(rng.integers(len(ys)))
                radius = np.sqrt(holder.sum() / np.pi) * part.size * rng.uniform(0.8, 1.2)
                mask = _blob(rng, size, np.array([ys[k], xs[k]], float), radius) & holder
        elif part.kind == "thin":
            mask = _curves(rng, size, part.width * size / 256)
        else:
            mask = np.zeros((size, size), bool)
            for _ in range(part.count):  # pieces apart from each other
                radius = part.size * size * rng.uniform(0.7, 1.3)
                for _ in range(20):
                    piece = _blob(rng, size, rng.uniform(0.1, 0.9, 2) * size, radius)
                    if not (ndimage.binary_dilation(piece, iterations=3) & mask).any():
                        mask |= piece
                        break
        masks.append(mask)
        label[mask] = i + 1
    return label


def _blob(rng: np.random.Generator, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """A smooth random shape: a circle whose radius varies with the angle by a few low harmonics."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = yy - centre[0], xx - centre[1]
    angle = np.arctan2(dy, dx)
    r = np.ones_like(angle)
    for k in range(2, 6):
        r += rng.uniform(0, 0.25 / k * 2) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) <= radius * r


def _curves(rng: np.random.Generator, size: int, width: float) -> np.ndarray:
    """Thin branching curves: smooth random walks from the border inwards, with branches, ``width`` pixels wide."""
    canvas = np.zeros((size, size), bool)
    starts = [(rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size, rng.uniform(0, 2 * np.pi), size * 0.8)]
    steps = 0
    while starts and steps < 12:
        y, x, heading, length = starts.pop()
        steps += 1
        turn = 0.0
        for _ in range(int(length)):
            turn = 0.9 * turn + rng.normal(0, 0.03)
            heading += turn
            y, x = y + np.sin(heading), x + np.cos(heading)
            if not (0 <= y < size and 0 <= x < size):
                break
            canvas[int(y), int(x)] = True
            if rng.random() < 0.01 and length > size * 0.15:  # a branch
                starts.append((y, x, heading + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0), length * 0.5))
    radius = max(0.5, width / 2)
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return ndimage.binary_dilation(canvas, structure=yy**2 + xx**2 <= radius**2 + 0.25)


def _smooth(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Smooth noise of unit spread with grain ``scale`` pixels."""
    coarse = torch.from_numpy(rng.normal(size=(size // max(scale, 1) + 2,) * 2)).float()[None, None]
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()


def _render(recipe: TaskRecipe, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = label.shape[0]
    jitter = rng.uniform(-8, 8)
    img = recipe.background + jitter + recipe.background_texture * _smooth(rng, size, 24)
    for i, part in enumerate(recipe.parts):
        where = label == i + 1
        img[where] = (part.mean + jitter + rng.uniform(-6, 6) + part.texture * _smooth(rng, size, part.scale))[where]
    img *= 1 + rng.uniform(0, recipe.bias) * _smooth(rng, size, size // 2)  # bias field
    img = ndimage.gaussian_filter(img, rng.uniform(0, recipe.blur) * size / 256)
    factor = rng.uniform(1, recipe.low_res)
    if factor > 1.05:  # acquired at a lower resolution
        low = F.interpolate(torch.from_numpy(img)[None, None], scale_factor=1 / factor, mode="area")
        img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()
    img = img + rng.normal(0, rng.uniform(0, recipe.noise), img.shape)
    tint = np.asarray(recipe.tint)[:, None, None]
    return np.clip(img[None] * tint, 0, 255).astype(np.uint8)


def write_tasks(
    root: str | Path, *, n_tasks: int, n_images: int, n_test: int = 0, size: int = 256, seed: int = 0
) -> list[Path]:
    """Write ``n_tasks`` random tasks as data-contract folders ``root/task_XXX`` (``n_images`` training and
    ``n_test`` test images each, PNG) and return their paths. Each ``dataset.json`` also keeps its recipe."""
    if n_tasks < 1 or n_images < 2:
        raise ValueError(f"need n_tasks >= 1 and n_images >= 2 (a target and a support), got {n_tasks}, {n_images}")
    folders = []
    for t in range(n_tasks):
        rng = np.random.default_rng([seed, t])
        recipe = draw_recipe(rng)
        folder = Path(root) / f"task_{t:03d}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        splits: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
        for i in range(n_images + n_test):
            image, label = draw_image(recipe, rng, size)
            name = f"task{t:03d}_{i:03d}.png"
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / "images" / name)
            Image.fromarray(label).save(folder / "labels" / name)
            split = "training" if i < n_images else "test"
            splits[split].append({"image": f"images/{name}", "label": f"labels/{name}"})
        meta = {
            "name": f"ppgseg random task {t}",
            "description": "generated by ppgseg.data.randomized (domain randomisation)",
            "labels": {"0": "background", **recipe.names()},
            "tensorImageSize": "2D",
            "recipe": asdict(recipe),
            **splits,
        }
        (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
        folders.append(folder)
    return folders
