"""Images in and label maps out: 2D images, volumes and DICOM series read with MONAI's `LoadImage`, label maps
written with the geometry of the image they were segmented from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, SaveImage
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".nrrd", ".mha", ".dcm")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # 2D formats, written back as PNG
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


def list_inputs(input_dir: str | Path) -> list[Path]:
    """Image files and DICOM series folders directly in ``input_dir``."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"input_dir {folder} is not a folder")
    found = sorted(
        p for p in folder.iterdir() if (p.is_dir() and any(p.iterdir())) or (p.is_file() and not p.name.startswith("."))
    )
    if not found:
        raise ValueError(f"input_dir {folder} is empty: expected images ({', '.join(IMAGE_SUFFIXES)}) or DICOM series")
    return found


def suffix(path: Path) -> str:
    """The file's suffix, lower case (``.nii.gz`` whole)."""
    return ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix.lower()


def stem(path: Path) -> str:
    """An input's name without its suffix (a DICOM series folder: its name)."""
    return path.name[: -len(suffix(path))] if path.is_file() else path.name


def label_suffix(path: Path, image: Tensor) -> str:
    """How the label of input ``path`` is written: 2D images as PNG; volumes keep .nii, .nii.gz, .nrrd or .mha,
    anything else (DICOM) becomes .nii.gz."""
    if image.dim() == 3 and suffix(path) in FRAME_SUFFIXES:
        return ".png"
    return suffix(path) if suffix(path) in VOLUME_SUFFIXES else ".nii.gz"


def read_image(path: str | Path, loader: LoadImage | None = None) -> MetaTensor:
    """A 2D image or 3D volume (C, *spatial) with its metadata; an unreadable file is a ValueError naming it."""
    loader = loader or LoadImage(image_only=True, ensure_channel_first=True)
    try:
        return loader(str(path))
    except Exception as err:  # MONAI raises several types for unreadable files
        raise ValueError(f"{path} is not a readable image or DICOM series ({err})") from err


def read_label(path: str | Path, loader: LoadImage | None = None) -> Tensor:
    """A label map file as (*spatial) uint8 ids (`read_image`, channel dropped, values rounded)."""
    return read_image(path, loader).as_tensor()[0].round().to(torch.uint8)


def write_label(label: Tensor, image: MetaTensor, output_dir: str | Path, name: str, ext: str = ".nii.gz") -> Path:
    """Write a label map with the geometry (affine, spacing) of the image it was segmented from, as
    ``output_dir/name + ext`` (MONAI's SaveImage)."""
    out = MetaTensor(label[None].to(torch.uint8), meta=image.meta)
    out.meta["filename_or_obj"] = str(Path(output_dir) / name)
    saver = SaveImage(
        output_dir=output_dir,
        output_postfix="",
        output_ext=ext,
        output_dtype=np.uint8,
        resample=False,
        separate_folder=False,
        print_log=False,
    )
    saver(out)
    return Path(output_dir) / f"{name}{ext}"


def voxel_spacing(image: MetaTensor) -> tuple[float, float, float]:
    """A volume's voxel spacing (x, y, z) as read (1 mm where the file says nothing)."""
    pixdim = getattr(image, "pixdim", None)
    if pixdim is None or len(pixdim) < 3:
        return (1.0, 1.0, 1.0)
    return tuple(float(s) if float(s) > 0 else 1.0 for s in pixdim[:3])


def slice_axis(image: MetaTensor, default: int = 2) -> int:
    """The axis a volume was acquired along: the one with the thickest voxel spacing, where it is clearly (a fifth)
    thicker than the others; ``default`` for near-isotropic voxels."""
    spacing = voxel_spacing(image)
    thick = max(range(3), key=lambda a: spacing[a])
    return thick if spacing[thick] > 1.2 * max(spacing[a] for a in range(3) if a != thick) else default
