"""What a data-contract folder gives the configs: the objects asked for, the 2D samples of a split, and its labelled
targets as a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from .contract import Sample, load_samples, read_split
from .intensity import to_byte_range
from .tiles import tile_samples


def select_objects(labels: dict[int, str], objects: Sequence[str] | str | None, where: str) -> dict[int, str]:
    """The label ids and names to segment: all of ``labels`` when ``objects`` is None, else those named (in that
    order). Unknown names raise ValueError naming ``where`` and the known names."""
    if objects is None:
        return dict(labels)
    names = [objects] if isinstance(objects, str) else list(objects)
    if not names:
        raise ValueError(f"objects is empty: name at least one of {sorted(labels.values())} (or null for all)")
    by_name = {v: k for k, v in labels.items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"objects {unknown} are not labels of {where}; its labels are {sorted(by_name)}")
    return {by_name[n]: n for n in names}


def split_samples(
    folder: str | Path, split: str, *, axis: int = 2, max_slices: int | None = None, tile: int | None = None
) -> list[Sample]:
    """The 2D samples of one split of a data-contract folder (with ``tile``: cut into native-resolution tiles of
    that side, training crops for images larger than the encoder input); an empty split is an error naming it."""
    samples = load_samples(read_split(folder, split), axis=axis, max_slices=max_slices)
    if not samples:
        raise ValueError(f"{Path(folder) / 'dataset.json'}: the {split!r} list has no labelled image")
    return tile_samples(samples, tile) if tile else samples


class TargetDataset(Dataset):
    """The labelled targets of one split: dicts of image (C, H, W) in [0, 255], label (N, H, W) one channel per
    requested object, and source. Use with ``DataLoader(batch_size=None)``."""

    def __init__(self, folder: str | Path, label_ids: Sequence[int], *, split: str = "test", axis: int = 2) -> None:
        self.samples, self.label_ids = split_samples(folder, split, axis=axis), list(label_ids)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        return {"image": to_byte_range(s.image), "label": s.masks(self.label_ids), "source": s.source}
