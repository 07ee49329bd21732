"""The generated demo datasets follow the data contract and are deterministic."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage

from ppgseg.data.generated.families import FAMILIES, write_family


def _digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".gz"):
        h.update(f.read_bytes())
    for f in sorted(folder.rglob("*.nii.gz")):
        h.update(nib.load(f).get_fdata().tobytes())  # gzip headers hold a timestamp; compare the voxels
    return h.hexdigest()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_follows_the_data_contract(tmp_path, family):
    folder = write_family(tmp_path, family, n_train=3, n_val=1, n_test=1, seed=0)
    train = load_decathlon_datalist(folder / "dataset.json", data_list_key="training", base_dir=folder)
    assert len(train) == 3
    assert len(load_decathlon_datalist(folder / "dataset.json", data_list_key="test", base_dir=folder)) == 1
    loader = LoadImage(image_only=True)
    declared = {int(k) for k in FAMILIES[family]}
    previous = None
    for item in train:
        image, label = loader(item["image"]), loader(item["label"])
        assert image.shape[:2] == label.shape[:2]
        values = set(np.unique(np.asarray(label)).astype(int).tolist())
        assert values == declared | {0}, f"{item['label']}: every object is present, nothing undeclared"
        if previous is not None:
            assert not np.array_equal(np.asarray(label), previous), "subjects differ"
        previous = np.asarray(label)
    if family == "ct":
        assert image.ndim == 3 and np.asarray(image).min() < -500  # HU: air around the body
        assert np.allclose(nib.load(train[0]["image"]).affine[:3, :3], np.diag([1.5, 1.5, 3.0]))


def test_same_seed_same_data(tmp_path):
    a = write_family(tmp_path / "a", "ultrasound", n_train=2, n_val=0, n_test=0, seed=3)
    b = write_family(tmp_path / "b", "ultrasound", n_train=2, n_val=0, n_test=0, seed=3)
    c = write_family(tmp_path / "c", "ultrasound", n_train=2, n_val=0, n_test=0, seed=4)
    assert _digest(a) == _digest(b) != _digest(c)


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="family"):
        write_family(tmp_path, "mri", n_train=1, n_val=0, n_test=0)
