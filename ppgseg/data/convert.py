"""Converters from public releases' folder layouts into the data contract (``dataset.json`` + images/ + labels/).

Nothing is downloaded: the user fetches a release and points a converter at the folder it unpacked to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def write_contract(
    out: str | Path,
    name: str,
    labels: dict[int, str],
    pairs: Sequence[tuple[str, np.ndarray, np.ndarray]],
    splits: dict[str, Sequence[str]],
) -> Path:
    """Write 2D (image, label) pairs as PNGs and a dataset.json.

    Args:
        pairs: (id, image (H, W) or (H, W, 3) uint8, label (H, W) with values in ``labels`` or 0).
        splits: split name -> ids in it ("training", "validation", "test").
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    allowed = {0, *labels}
    entries = {}
    for pid, image, label in pairs:
        extra = set(np.unique(label).tolist()) - allowed
        if extra:
            raise ValueError(f"{pid}: label values {sorted(extra)} are not among {sorted(allowed)}")
        if image.shape[:2] != label.shape:
            raise ValueError(f"{pid}: label {label.shape} does not match image {image.shape[:2]}")
        Image.fromarray(image).save(out / "images" / f"{pid}.png")
        Image.fromarray(label.astype(np.uint8)).save(out / "labels" / f"{pid}.png")
        entries[pid] = {"image": f"images/{pid}.png", "label": f"labels/{pid}.png"}
    meta = {
        "name": name,
        "labels": {"0": "background", **{str(k): v for k, v in labels.items()}},
        "tensorImageSize": "2D",
        **{s: [entries[i] for i in ids] for s, ids in splits.items()},
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out


def split_ids(
    ids: Sequence[str], n_train: int, n_val: int, seed: int, group: Callable[[str], str] = lambda i: i
) -> dict[str, list[str]]:
    """Shuffle groups (patients, videos) with ``seed``; the first ``n_train`` groups train, the next ``n_val``
    validate, the rest test, so no group is in two splits."""
    groups = sorted({group(i) for i in ids})
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    if n_train + n_val >= len(order):
        raise ValueError(f"{len(order)} groups cannot give {n_train} training + {n_val} validation and a test split")
    split_of = {
        g: "training" if k < n_train else "validation" if k < n_train + n_val else "test" for k, g in enumerate(order)
    }
    out: dict[str, list[str]] = {"training": [], "validation": [], "test": []}
    for i in sorted(ids):
        out[split_of[group(i)]].append(i)
    return out


def convert_fpa(src: str | Path, out: str | Path, *, n_train: int = 16, n_val: int = 4, seed: int = 0) -> Path:
    """FH-PS-AOP (MICCAI 2023 challenge, Zenodo 7851339).

    Layout: ``<src>/image_mha/<id>.mha`` (3 x 256 x 256 ultrasound) and ``<src>/label_mha/<id>.mha`` (256 x 256,
    0 background, 1 pubic symphysis, 2 fetal head). ``src`` may also be the folder above "Pubic Symphysis-Fetal Head
    Segmentation and Angle of Progression".
    """
    import SimpleITK as sitk

    src = Path(src)
    nested = src / "Pubic Symphysis-Fetal Head Segmentation and Angle of Progression"
    src = nested if nested.is_dir() else src
    images = sorted((src / "image_mha").glob("*.mha"))
    if not images:
        raise FileNotFoundError(f"no image_mha/*.mha under {src}: expected the FH-PS-AOP release layout")
    pairs = []
    for path in images:
        label_path = src / "label_mha" / path.name
        if not label_path.is_file():
            raise FileNotFoundError(f"{path} has no label {label_path}")
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        image = np.moveaxis(image, 0, -1) if image.ndim == 3 and image.shape[0] == 3 else image
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
        pairs.append((path.stem, np.ascontiguousarray(image).astype(np.uint8), label))
    splits = split_ids([p[0] for p in pairs], n_train, n_val, seed)
    return write_contract(out, "FH-PS-AOP", {1: "pubic_symphysis", 2: "fetal_head"}, pairs, splits)


_JNU_VALUES = {7: 1, 8: 2}  # pubic symphysis, fetal head in the release's masks


def convert_jnu_ifm(src: str | Path, out: str | Path, *, n_train: int = 16, n_val: int = 4, seed: int = 0) -> Path:
    """JNU-IFM (Lu et al. 2022): one folder per video, ``<src>/<video>/image/<video>_<frame>.png`` and
    ``<src>/<video>/mask/<video>_<frame>_mask.png`` with 7 = pubic symphysis, 8 = fetal head.

    Splits are by video (``n_train`` / ``n_val`` videos), so a support never comes from the target's own video.
    """
    src = Path(src)
    frames = sorted(src.glob("*/image/*.png"))
    if not frames:
        raise FileNotFoundError(f"no <video>/image/*.png under {src}: expected the JNU-IFM release layout")
    pairs = []
    for path in frames:
        mask_path = path.parent.parent / "mask" / f"{path.stem}_mask.png"
        if not mask_path.is_file():
            continue  # unannotated frame
        raw = np.array(Image.open(mask_path))
        raw = raw[..., 0] if raw.ndim == 3 else raw
        label = np.zeros(raw.shape, np.uint8)
        for value, obj in _JNU_VALUES.items():
            label[raw == value] = obj
        image = np.array(Image.open(path).convert("L"))
        pairs.append((path.stem, image, label))
    if not pairs:
        raise FileNotFoundError(f"no frame under {src} has a mask/<frame>_mask.png")
    video = {p[0]: re.sub(r"_\d+$", "", p[0]) for p in pairs}
    splits = split_ids(list(video), n_train, n_val, seed, group=video.__getitem__)
    return write_contract(out, "JNU-IFM", {1: "pubic_symphysis", 2: "fetal_head"}, pairs, splits)


def _open_image(path: Path) -> Image.Image:
    """PIL image from a file, gunzipping ``*.gz`` (STARE ships ``.ppm.gz``)."""
    if path.suffix == ".gz":
        import gzip
        import io

        with gzip.open(path) as f:
            return Image.open(io.BytesIO(f.read()))
    return Image.open(path)


def convert_refuge2(src: str | Path, out: str | Path, *, n_train: int = 16, n_val: int = 4, seed: int = 0) -> Path:
    """REFUGE / REFUGE2 fundus photographs with optic disc and cup masks.

    Layout: every ``*.bmp`` mask under ``src`` (values 255 background, 128 disc rim, 0 cup) is paired with the
    ``*.jpg`` / ``*.png`` image of the same name anywhere under ``src``; this covers the 2018 release
    (``Training400/<class>/g0001.jpg`` + ``Annotation-Training400/Disc_Cup_Masks/<class>/g0001.bmp``) and the REFUGE2
    folders (``<split>/images/*.jpg`` + ``<split>/mask/*.bmp``). Labels are disjoint: 1 = optic disc rim (disc minus
    cup), 2 = optic cup; the paper's "disc" is the union of 1 and 2.
    """
    src = Path(src)
    masks = {p.stem: p for p in sorted(src.rglob("*.bmp"))}
    images = {p.stem: p for p in sorted([*src.rglob("*.jpg"), *src.rglob("*.png")]) if p.stem in masks}
    if not images:
        raise FileNotFoundError(
            f"no *.bmp disc/cup mask with a same-named *.jpg/*.png under {src}: expected a REFUGE/REFUGE2 release"
        )
    pairs = []
    for stem, path in images.items():
        raw = np.array(_open_image(masks[stem]).convert("L"))
        label = np.zeros(raw.shape, np.uint8)
        label[raw < 64] = 2
        label[(raw >= 64) & (raw < 192)] = 1
        pairs.append((stem, np.array(_open_image(path).convert("RGB")), label))
    splits = split_ids([p[0] for p in pairs], n_train, n_val, seed)
    return write_contract(out, "REFUGE2", {1: "optic_disc", 2: "optic_cup"}, pairs, splits)


def convert_stare(
    src: str | Path, out: str | Path, *, n_train: int = 16, n_val: int = 0, seed: int = 0, annotator: str = "ah"
) -> Path:
    """STARE vessels (Hoover et al. 2000): ``im0001.ppm[.gz]`` images (the all-images archive) and
    ``im0001.ah.ppm[.gz]`` hand labels (labels-ah; ``annotator="vk"`` for labels-vk), anywhere under ``src``."""
    src = Path(src)
    pattern = re.compile(r"^(im\d{4})\.ppm(\.gz)?$")
    found = {m.group(1): p for p in sorted(src.rglob("im*")) if (m := pattern.match(p.name))}
    labels = {p.name.split(".")[0]: p for p in sorted(src.rglob(f"im*.{annotator}.ppm*"))}
    ids = sorted(set(found) & set(labels))
    if not ids:
        raise FileNotFoundError(
            f"no imNNNN.ppm[.gz] with an imNNNN.{annotator}.ppm[.gz] label under {src}: expected the STARE archives"
        )
    pairs = []
    for i in ids:
        label = (np.array(_open_image(labels[i]).convert("L")) > 127).astype(np.uint8)
        pairs.append((i, np.array(_open_image(found[i]).convert("RGB")), label))
    splits = split_ids(ids, n_train, n_val, seed)
    return write_contract(out, "STARE", {1: "vessel"}, pairs, splits)


def convert_drive(src: str | Path, out: str | Path, *, n_train: int = 20, n_val: int = 0, seed: int = 0) -> Path:
    """DRIVE retinal vessels (Staal et al. 2004), the official release as unpacked:
    ``training/images/21_training.tif`` + ``training/1st_manual/21_manual1.gif`` (images 21-40) and
    ``test/images/01_test.tif`` + ``test/1st_manual/01_manual1.gif`` (01-20); ``src`` may be the folder above
    ``DRIVE/``. The official split is kept: the test folder is the test split; of the training folder, a seeded draw
    of ``n_val`` images validates and ``n_train`` train (all 20 by default). Vessels = 1; the field-of-view masks
    are not used.
    """
    src = Path(src)
    src = src / "DRIVE" if (src / "DRIVE" / "training").is_dir() else src
    pairs, split_of = [], {}
    for folder, split in (("training", "training"), ("test", "test")):
        images = sorted((src / folder / "images").glob(f"*_{folder}.tif"))
        if not images:
            raise FileNotFoundError(f"no {folder}/images/*_{folder}.tif under {src}: expected the DRIVE release layout")
        for path in images:
            number = path.name.split("_")[0]
            manual = src / folder / "1st_manual" / f"{number}_manual1.gif"
            if not manual.is_file():
                raise FileNotFoundError(f"{path} has no first-observer label {manual}")
            label = (np.array(Image.open(manual).convert("L")) > 127).astype(np.uint8)
            pairs.append((f"drive_{number}", np.array(Image.open(path).convert("RGB")), label))
            split_of[f"drive_{number}"] = split
    train_ids = [i for i, s in split_of.items() if s == "training"]
    if n_train + n_val > len(train_ids):
        raise ValueError(f"the training folder has {len(train_ids)} images, fewer than {n_train} + {n_val} asked")
    order = [train_ids[i] for i in np.random.default_rng(seed).permutation(len(train_ids))]
    splits = {
        "training": sorted(order[:n_train]),
        "validation": sorted(order[n_train : n_train + n_val]),
        "test": [i for i, s in split_of.items() if s == "test"],
    }
    return write_contract(out, "DRIVE", {1: "vessel"}, pairs, splits)


def _cxr_masks(pngs: dict[tuple[str, str], Path], stem: str) -> list[Path]:
    """The lung mask files of one chest X-ray: Montgomery's left + right masks, or Shenzhen's one mask.
    ``pngs`` maps (parent folder name, file name) to the path of every PNG in the release."""
    both = [pngs[side, f"{stem}.png"] for side in ("leftMask", "rightMask") if (side, f"{stem}.png") in pngs]
    if both:
        return both
    return [p for (parent, name), p in pngs.items() if name == f"{stem}_mask.png" and parent != "CXR_png"]


def convert_cxr(
    src: str | Path, out: str | Path, *, n_train: int = 16, n_val: int = 4, seed: int = 0, size: int = 512
) -> Path:
    """Chest X-rays with lung masks: the Montgomery County set (``MontgomerySet/CXR_png/MCUCXR_0001_0.png`` +
    ``ManualMask/leftMask|rightMask/MCUCXR_0001_0.png``) and the Shenzhen set (``CXR_png/CHNCXR_0001_0.png`` + a
    mask folder with ``CHNCXR_0001_0_mask.png``, as the Shenzhen lung-mask release names them), either or both
    anywhere under ``src``. Images without a mask are left out. Both lungs = 1. Images and masks are resized to
    ``size`` x ``size`` (the releases are up to 4892 pixels a side; 0 keeps them). One image per patient, so the
    seeded split is by image.
    """
    src = Path(src)
    images = sorted(p for p in src.rglob("CXR_png/*.png"))
    if not images:
        raise FileNotFoundError(f"no CXR_png/*.png under {src}: expected the Montgomery or Shenzhen release layout")
    pngs = {(p.parent.name, p.name): p for p in src.rglob("*.png")}
    pairs = []
    for path in images:
        masks = _cxr_masks(pngs, path.stem)
        if not masks:
            continue
        image = Image.open(path).convert("L")
        lungs = np.zeros(image.size[::-1], bool)
        for m in masks:
            raw = Image.open(m).convert("L")
            if raw.size != image.size:
                raise ValueError(f"mask {m} is {raw.size}, its image {path} is {image.size}")
            lungs |= np.array(raw) > 127
        label = Image.fromarray(lungs.astype(np.uint8))
        if size:
            image = image.resize((size, size), Image.BILINEAR)
            label = label.resize((size, size), Image.NEAREST)
        pairs.append((path.stem, np.array(image), np.array(label)))
    if not pairs:
        raise FileNotFoundError(f"no CXR_png image under {src} has a lung mask (ManualMask/ or *_mask.png)")
    splits = split_ids([p[0] for p in pairs], n_train, n_val, seed)
    return write_contract(out, "CXR lungs (Montgomery, Shenzhen)", {1: "lungs"}, pairs, splits)


def cli(convert: Callable[..., Path], *, n_train: int = 16, n_val: int = 4) -> None:
    """Command line of a converter script: ``SRC OUT [--n-train N] [--n-val N] [--seed 0]``."""
    import argparse

    parser = argparse.ArgumentParser(description=convert.__doc__)
    parser.add_argument("src", help="the folder the release was unpacked to")
    parser.add_argument("out", help="the data-contract folder to write")
    parser.add_argument("--n-train", type=int, default=n_train)
    parser.add_argument("--n-val", type=int, default=n_val)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {convert(args.src, args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed)}")
