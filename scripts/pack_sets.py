"""A compact copy of data-contract folders for a machine with little room (a device run): 2D images scaled to a
longest side of --side pixels (the encoder's input), a validation split carved from the training split, and for 3D
studies both the volumes (training banks, validation) and one 2D slice per study (the 2D protocol's supports and
targets, each from another subject).

    python scripts/pack_sets.py ../shared/realdata/{ddti_thyroid,cxr_lungs,drive,hippocampus_mri} --out .pack \
        --train 100 --val 16 --test 24
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from ppgseg.data.contract import read_labels, read_split


def scaled_png(src: str, dst: Path, side: int, label: bool) -> None:
    """``src`` written to ``dst`` with its longest side at most ``side`` (labels by nearest neighbour)."""
    im = Image.open(src)
    s = side / max(im.size)
    if s < 1:
        size = (max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s)))
        im = im.resize(size, Image.NEAREST if label else Image.BILINEAR)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.save(dst)


def middle_slice(item: dict[str, str], axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The slice along ``axis`` with the most labelled voxels: (image, label) as 2D arrays."""
    image, label = (np.asarray(nib.load(item[k]).dataobj) for k in ("image", "label"))
    z = int(np.argmax((label > 0).sum(axis=tuple(a for a in range(3) if a != axis))))
    return np.take(image, z, axis).astype(np.float32), np.take(label, z, axis).astype(np.uint8)


def pack(folder: Path, out: Path, *, side: int, n_train: int, n_val: int, n_test: int, axis: int) -> list[Path]:
    """Writes the compact copy of ``folder`` under ``out``; returns the folders written."""
    meta = json.loads((folder / "dataset.json").read_text())
    train, test = read_split(folder, "training"), read_split(folder, "test") if meta.get("test") else []
    splits = {"training": train[:n_train], "validation": train[n_train : n_train + n_val], "test": test[:n_test]}
    labels = {str(k): v for k, v in {0: "background", **read_labels(folder)}.items()}
    volume = nib.load(train[0]["label"]).ndim == 3 if str(train[0]["label"]).endswith((".nii", ".nii.gz")) else False
    written = []
    if volume:  # the studies as they are (training banks, validation), then one 2D slice per study
        dst = out / folder.name
        lists = {}
        for split in ("training", "validation"):
            lists[split] = []
            for item in splits[split]:
                entry = {}
                for key in ("image", "label"):
                    rel = Path(item[key]).relative_to(folder.resolve())
                    (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(item[key], dst / rel)
                    entry[key] = str(rel)
                lists[split].append(entry)
        (dst / "dataset.json").write_text(json.dumps({**meta, "labels": labels, **lists, "test": []}, indent=1))
        written.append(dst)
        dst = out / f"{folder.name}_slices"
        lists = {}
        for split in ("training", "test"):
            lists[split] = []
            for item in splits[split]:
                image, label = middle_slice(item, axis)
                stem = Path(item["image"]).name.split(".")[0]
                entry = {"image": f"images/{stem}.nii.gz", "label": f"labels/{stem}.nii.gz"}
                for key, arr in (("image", image.T), ("label", label.T)):  # read back transposed, as 2D files are
                    (dst / entry[key]).parent.mkdir(parents=True, exist_ok=True)
                    nib.save(nib.Nifti1Image(arr, np.eye(4)), dst / entry[key])
                lists[split].append(entry)
        desc = f"{meta.get('description', '')}; one slice per study (the most labelled along axis {axis})"
        (dst / "dataset.json").write_text(
            json.dumps({**meta, "description": desc, "labels": labels, **lists}, indent=1)
        )
        written.append(dst)
        return written
    dst = out / folder.name
    lists = {}
    for split, items in splits.items():
        lists[split] = []
        for item in items:
            entry = {}
            for key in ("image", "label"):
                rel = Path(item[key]).relative_to(folder.resolve()).with_suffix(".png")
                scaled_png(item[key], dst / rel, side, label=key == "label")
                entry[key] = str(rel)
            lists[split].append(entry)
    desc = f"{meta.get('description', '')}; longest side scaled to {side}"
    (dst / "dataset.json").write_text(json.dumps({**meta, "description": desc, "labels": labels, **lists}, indent=1))
    return [dst]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="data-contract folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--side", type=int, default=256, help="longest side of 2D images (the encoder's input)")
    p.add_argument("--train", type=int, default=100, help="training pairs (studies) kept")
    p.add_argument("--val", type=int, default=16, help="further training pairs kept as the validation split")
    p.add_argument("--test", type=int, default=24, help="test pairs kept")
    p.add_argument("--axis", type=int, default=2, help="slice axis of 3D studies")
    a = p.parse_args()
    for folder in a.folders:
        for d in pack(folder.resolve(), a.out, side=a.side, n_train=a.train, n_val=a.val, n_test=a.test, axis=a.axis):
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            print(f"{d}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
