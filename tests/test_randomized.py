"""The domain-randomised task generator: deterministic under a seed, and its label maps hold the parts asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from ppgseg.data.contract import read_labels
from ppgseg.data.generated.tasks import draw_image, draw_recipe, write_tasks
from ppgseg.data.splits import split_samples


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tasks_are_data_contract_folders_and_repeat_under_a_seed(tmp_path):
    first = write_tasks(tmp_path / "a", n_tasks=2, n_images=3, n_test=1, size=96, seed=3)
    again = write_tasks(tmp_path / "b", n_tasks=2, n_images=3, n_test=1, size=96, seed=3)
    write_tasks(tmp_path / "c", n_tasks=2, n_images=3, n_test=1, size=96, seed=4)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")
    for folder in first:
        meta = json.loads((folder / "dataset.json").read_text())
        names = read_labels(folder)
        assert len(meta["training"]) == 3 and len(meta["test"]) == 1
        assert list(names) == list(range(1, len(meta["recipe"]["parts"]) + 1))
        for sample in split_samples(folder, "training"):  # every part shows in every image
            assert sample.shows(list(names)) == set(names)
    assert [p.name for p in again] == ["task_000", "task_001"]


@pytest.mark.parametrize("seed", range(4))
def test_label_maps_hold_nested_thin_and_several_parts(seed):
    rng = np.random.default_rng(seed)
    recipe = draw_recipe(rng, kinds=("blob", "nested", "thin", "several"))
    image, label = draw_image(recipe, rng, size=128)
    assert image.shape == (3, 128, 128) and image.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1, 2, 3, 4}
    # nested: part 2 lies inside part 1, so it never touches the background (later parts may cover part 1, not clear it)
    assert not (ndimage.binary_dilation(label == 2) & (label == 0)).any()
    # thin: a few pixels wide (at most 6 at 256 pixels, 3 here): a 7x7 erosion leaves almost nothing of it
    thin = label == 3
    assert ndimage.binary_erosion(thin, structure=np.ones((7, 7))).sum() <= 0.02 * thin.sum()
    # several: apart pieces
    assert ndimage.label(label == 4)[1] >= 2
    # each part has an intensity of its own (blurred and down-sampled, a thin part may lose much of its contrast)
    planned = [recipe.background] + [p.mean for p in recipe.parts]
    assert min(abs(a - b) for i, a in enumerate(planned) for b in planned[i + 1 :]) >= 30
    drawn = [image[:, label == v].mean() for v in (0, 1, 2, 4)]
    assert min(abs(a - b) for i, a in enumerate(drawn) for b in drawn[i + 1 :]) > 5


def test_bad_recipes_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="nested but no earlier part"):
        draw_recipe(rng, kinds=("thin", "nested"))
    with pytest.raises(ValueError, match="kind must be one of"):
        draw_recipe(rng, kinds=("blob", "tube"))
    with pytest.raises(ValueError, match="n_images >= 2"):
        write_tasks("unused", n_tasks=1, n_images=1)
