"""Converters, on tiny fake trees that mirror each public release's layout."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from ppgseg.data.contract import load_samples, read_labels, read_split
from ppgseg.data.convert import convert_drive, convert_fpa, convert_jnu_ifm, convert_refuge2, convert_stare
from ppgseg.data.video import load_clips


def _fake_fpa(root, n=5):
    rng = np.random.default_rng(0)
    base = root / "Pubic Symphysis-Fetal Head Segmentation and Angle of Progression"
    (base / "image_mha").mkdir(parents=True)
    (base / "label_mha").mkdir()
    labels = {}
    for i in range(n):
        image = rng.integers(0, 255, (3, 32, 40), dtype=np.uint8)
        label = np.zeros((32, 40), np.uint8)
        label[2:8, 3:12] = 1
        label[14 + i : 28, 10:30] = 2
        sitk.WriteImage(sitk.GetImageFromArray(image), str(base / "image_mha" / f"{i:05d}.mha"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(base / "label_mha" / f"{i:05d}.mha"))
        labels[f"{i:05d}"] = label
    return labels


def test_fpa(tmp_path):
    truth = _fake_fpa(tmp_path / "src")
    out = convert_fpa(tmp_path / "src", tmp_path / "fpa", n_train=2, n_val=1)
    assert read_labels(out) == {1: "pubic_symphysis", 2: "fetal_head"}
    splits = {s: read_split(out, s) for s in ("training", "validation", "test")}
    assert [len(v) for v in splits.values()] == [2, 1, 2]
    for sample in load_samples(splits["training"]):
        pid = sample.source.split("/")[-1].removesuffix(".png")
        assert sample.image.shape == (3, 32, 40)
        assert np.array_equal(sample.label.numpy(), truth[pid])


def test_jnu_ifm_splits_by_video(tmp_path):
    src = tmp_path / "src"
    for v in range(4):
        video = f"2019091{v}T104520"
        (src / video / "image").mkdir(parents=True)
        (src / video / "mask").mkdir()
        for f in range(3):
            Image.fromarray(np.full((24, 30), 50 * v, np.uint8)).save(src / video / "image" / f"{video}_{f}.png")
            mask = np.zeros((24, 30), np.uint8)
            mask[2:6, 2:9] = 7
            mask[10:20, 8:25] = 8
            if f < 2:  # the last frame is unannotated
                Image.fromarray(mask).save(src / video / "mask" / f"{video}_{f}_mask.png")
    cmd = [
        sys.executable,
        "scripts/convert_jnu_ifm.py",
        str(src),
        str(tmp_path / "jnu"),
        "--n-train",
        "2",
        "--n-val",
        "1",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    out = tmp_path / "jnu"
    videos = {
        s: {e["image"].split("/")[-1].rsplit("_", 1)[0] for e in read_split(out, s)}
        for s in ("training", "validation", "test")
    }
    assert [len(v) for v in videos.values()] == [2, 1, 1]
    assert not (videos["training"] & videos["test"]) and not (videos["training"] & videos["validation"])
    sample = load_samples(read_split(out, "training"))[0]
    assert set(np.unique(sample.label.numpy()).tolist()) == {0, 1, 2} and len(read_split(out, "training")) == 4
    clips = load_clips(out, "training")  # video mode reads the same output as clips of ordered frames
    assert [c.name for c in clips] == sorted(videos["training"]) and all(len(c) == 2 for c in clips)


def test_converters_say_which_layout_they_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="FH-PS-AOP"):
        convert_fpa(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="JNU-IFM"):
        convert_jnu_ifm(tmp_path, tmp_path / "out")


def test_refuge2_pairs_masks_with_images_by_name(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val"):
        (src / split / "images").mkdir(parents=True)
        (src / split / "mask").mkdir()
        for i in range(3):
            stem = f"{split[0]}{i:04d}"
            Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(src / split / "images" / f"{stem}.jpg")
            mask = np.full((20, 24), 255, np.uint8)
            mask[4:16, 6:18] = 128
            mask[8:12, 10:14] = 0
            Image.fromarray(mask).save(src / split / "mask" / f"{stem}.bmp")
    out = convert_refuge2(src, tmp_path / "refuge", n_train=3, n_val=1)
    assert read_labels(out) == {1: "optic_disc", 2: "optic_cup"}
    sample = load_samples(read_split(out, "training"))[0]
    assert sample.label[10, 12] == 2 and sample.label[5, 7] == 1 and sample.label[0, 0] == 0
    assert sample.label.eq(2).sum() == 16 and sample.label.eq(1).sum() == 12 * 12 - 16


def test_stare_reads_gzipped_ppm(tmp_path):
    import gzip
    import io

    src = tmp_path / "src"
    (src / "stare-images").mkdir(parents=True)
    (src / "labels-ah").mkdir()

    def save_gz(array, path):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PPM")
        path.write_bytes(gzip.compress(buf.getvalue()))

    for i in range(1, 5):
        save_gz(np.full((16, 20, 3), 30 * i, np.uint8), src / "stare-images" / f"im{i:04d}.ppm.gz")
        vessel = np.zeros((16, 20, 3), np.uint8)
        vessel[:, 9:11] = 255
        save_gz(vessel, src / "labels-ah" / f"im{i:04d}.ah.ppm.gz")
    out = convert_stare(src, tmp_path / "stare", n_train=3)
    assert [len(read_split(out, s)) for s in ("training", "test")] == [3, 1]
    sample = load_samples(read_split(out, "test"))[0]
    assert sample.label.sum() == 16 * 2 and set(sample.label.unique().tolist()) == {0, 1}


def test_drive_keeps_the_official_split(tmp_path):
    src = tmp_path / "src" / "DRIVE"
    for folder, numbers in (("training", range(21, 25)), ("test", range(1, 3))):
        (src / folder / "images").mkdir(parents=True)
        (src / folder / "1st_manual").mkdir()
        for n in numbers:
            Image.fromarray(np.full((18, 17, 3), 5 * n, np.uint8)).save(
                src / folder / "images" / f"{n:02d}_{folder}.tif"
            )
            vessel = np.zeros((18, 17), np.uint8)
            vessel[:, n % 10 : n % 10 + 2] = 255
            Image.fromarray(vessel).save(src / folder / "1st_manual" / f"{n:02d}_manual1.gif")
    cmd = [sys.executable, "scripts/convert_drive.py", str(tmp_path / "src"), str(tmp_path / "drive"), "--n-train", "3"]
    cmd += ["--n-val", "1"]
    subprocess.run(cmd, check=True, capture_output=True)
    out = tmp_path / "drive"
    ids = {s: [e["image"].split("/")[-1] for e in read_split(out, s)] for s in ("training", "validation", "test")}
    assert ids["test"] == ["drive_01.png", "drive_02.png"]
    assert sorted(ids["training"] + ids["validation"]) == [f"drive_{n}.png" for n in range(21, 25)]
    assert len(ids["validation"]) == 1
    sample = load_samples(read_split(out, "test"))[1]
    assert sample.image.shape == (3, 18, 17) and sample.label.sum() == 18 * 2
    assert sample.label[:, 2:4].all() and read_labels(out) == {1: "vessel"}
    with pytest.raises(FileNotFoundError, match="DRIVE"):
        convert_drive(tmp_path / "empty", tmp_path / "out")


def test_cxr_joins_both_lungs_of_montgomery_and_reads_shenzhen(tmp_path):
    from ppgseg.data.convert import convert_cxr

    mont, shen = tmp_path / "src" / "MontgomerySet", tmp_path / "src" / "ChinaSet_AllFiles"
    for d in (mont / "CXR_png", mont / "ManualMask" / "leftMask", mont / "ManualMask" / "rightMask", shen / "CXR_png"):
        d.mkdir(parents=True)
    (tmp_path / "src" / "mask").mkdir()
    for i in range(3):
        stem = f"MCUCXR_{i:04d}_0"
        Image.fromarray(np.full((40, 32), 100, np.uint8)).save(mont / "CXR_png" / f"{stem}.png")
        left, right = np.zeros((40, 32), np.uint8), np.zeros((40, 32), np.uint8)
        left[10:30, 2:12], right[10:30, 20:30] = 255, 255
        Image.fromarray(left).save(mont / "ManualMask" / "leftMask" / f"{stem}.png")
        Image.fromarray(right).save(mont / "ManualMask" / "rightMask" / f"{stem}.png")
        stem = f"CHNCXR_{i:04d}_{i % 2}"
        Image.fromarray(np.full((40, 32), 60, np.uint8)).save(shen / "CXR_png" / f"{stem}.png")
        lungs = np.zeros((40, 32), np.uint8)
        lungs[5:35, 4:28] = 255
        if i < 2:  # the third Shenzhen image has no mask and is left out
            Image.fromarray(lungs).save(tmp_path / "src" / "mask" / f"{stem}_mask.png")
    out = convert_cxr(tmp_path / "src", tmp_path / "cxr", n_train=2, n_val=1, size=0)
    entries = [e for s in ("training", "validation", "test") for e in read_split(out, s)]
    assert len(entries) == 5 and read_labels(out) == {1: "lungs"}
    by_name = {s.source.split("/")[-1]: s for s in load_samples(entries)}
    assert by_name["MCUCXR_0000_0.png"].label.sum() == 2 * 20 * 10
    assert by_name["CHNCXR_0001_1.png"].label.sum() == 30 * 24
    resized = convert_cxr(tmp_path / "src", tmp_path / "cxr64", n_train=2, n_val=1, size=64)
    assert load_samples(read_split(resized, "training"))[0].label.shape == (64, 64)
    with pytest.raises(FileNotFoundError, match="Montgomery or Shenzhen"):
        convert_cxr(tmp_path / "src" / "mask", tmp_path / "out")
