"""Data contract reading and the episode sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from proxyprompt.data.contract import Sample, load_samples, read_labels, read_split
from proxyprompt.data.demo import write_family
from proxyprompt.data.episodes import EpisodeSampler, PairAugment


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return {f: write_family(root, f, n_train=4, n_val=0, n_test=0, seed=1) for f in ("ultrasound", "ct")}


def test_reads_2d_pngs_in_file_orientation(demo):
    items = read_split(demo["ultrasound"])
    samples = load_samples(items)
    assert len(samples) == 4
    label_file = np.array(Image.open(items[0]["label"]))
    assert samples[0].image.shape == (1, *label_file.shape)
    assert np.array_equal(samples[0].label.numpy(), label_file)
    assert read_labels(demo["ultrasound"]) == {1: "pubic_symphysis", 2: "fetal_head"}


def test_3d_volumes_become_slices_with_objects(demo):
    samples = load_samples(read_split(demo["ct"]), axis=2)
    assert len(samples) > 4 and all(s.label.any() for s in samples)
    assert samples[0].image.shape == (1, 96, 96) and "#2:" in samples[0].source


def test_bad_folders_name_the_file(tmp_path, demo):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        read_labels(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    meta = json.loads((demo["ultrasound"] / "dataset.json").read_text())
    meta["training"][0]["image"] = "images/missing.png"
    (bad / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_split(bad)
    (bad / "dataset.json").write_text("not json")
    with pytest.raises(ValueError, match="labels"):
        read_labels(bad)


def test_support_never_contains_the_target(demo):
    samples = load_samples(read_split(demo["ultrasound"]))
    sampler = EpisodeSampler(samples, [1, 2], num_support=3, size=64, seed=0)
    for _ in range(30):
        ep = sampler.sample()
        assert ep.target_index not in ep.support_indices and len(set(ep.support_indices)) == 3
        n = len(ep.objects)
        assert 1 <= n <= 2 and set(ep.objects) <= {1, 2}
        assert ep.target.shape == (3, 64, 64) and ep.target_masks.shape == (n, 64, 64)
        assert ep.support.shape == (3, 3, 64, 64) and ep.support_masks.shape == (3, n, 64, 64)
        assert set(ep.support_masks.unique().tolist()) <= {0.0, 1.0}


def test_one_augmentation_draw_for_the_whole_support_set():
    """Two identical support pairs come out identical; the target's own draw differs."""
    rng = np.random.default_rng(0)
    image = torch.rand(3, 48, 48) * 255
    mask = torch.zeros(1, 48, 48)
    mask[:, 10:30, 15:35] = 1
    samples = [Sample(image, mask[0].long(), f"s{i}") for i in range(3)]
    sampler = EpisodeSampler(samples, [1], num_support=2, size=48, seed=0)
    for _ in range(5):
        ep = sampler.sample()
        torch.testing.assert_close(ep.support[0], ep.support[1])
        torch.testing.assert_close(ep.support_masks[0], ep.support_masks[1])
        assert not torch.allclose(ep.support[0], ep.target)  # the target's draw is its own
    outs = [PairAugment(rng)(image, mask) for _ in range(4)]
    assert all(o.shape == image.shape and m.shape == mask.shape for o, m in outs)
    assert any(not torch.equal(m, mask) for _, m in outs)  # a draw can be near-identity (rotation cancels shear)


def test_sampler_refuses_too_few_samples():
    s = Sample(torch.zeros(1, 8, 8), torch.zeros(8, 8, dtype=torch.long), "x")
    with pytest.raises(ValueError, match="at least 2 samples"):
        EpisodeSampler([s], [1], num_support=1)
