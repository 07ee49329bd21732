"""Data contract reading and the episode sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ppgseg.data.contract import Sample, load_samples, read_labels, read_split
from ppgseg.data.episodes import EpisodeSampler, PairAugment, subject_of
from ppgseg.data.generated.families import write_family


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


def test_support_never_contains_the_target_nor_its_study(demo):
    samples = load_samples(read_split(demo["ct"]), axis=2)
    sampler = EpisodeSampler(samples, [1, 2, 3], num_support=3, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        d = sampler.draw(rng)
        study = subject_of(samples[d.target])
        assert d.target not in d.support and len(set(d.support)) == 3
        assert all(subject_of(samples[i]) != study for i in d.support)  # no neighbouring slice of the same volume
        assert 1 <= len(d.objects) <= 3 and len(set(d.objects)) == len(d.objects)
        for o in d.objects:  # every requested object is shown by some support mask
            assert any(bool((samples[i].label == o).any()) for i in d.support)


def test_one_augmentation_draw_per_view_for_the_whole_training_set():
    """Identical samples stay identical inside a view (one draw for all), views differ, masks follow the images."""
    from ppgseg import build_model
    from ppgseg.training import EpisodeBank

    model = build_model("sam_tiny", "tiny", pretrained=False)
    image = torch.rand(3, 48, 64) * 255
    label = torch.zeros(48, 64, dtype=torch.long)
    label[10:30, 15:35] = 1
    samples = [Sample(image, label, f"s{i}") for i in range(3)]
    bank = EpisodeBank(model, samples, [1], views=3, seed=0)
    assert bank.x.shape[:2] == (3, 3) and bank.masks.shape[:3] == (3, 3, 1)
    for v in range(3):
        torch.testing.assert_close(bank.x[v, 0], bank.x[v, 2])
        torch.testing.assert_close(bank.masks[v, 0], bank.masks[v, 1])
    assert not torch.allclose(bank.x[0, 0], bank.x[1, 0]) and not torch.allclose(bank.x[1, 0], bank.x[2, 0])
    assert any(not torch.equal(bank.masks[0, 0], bank.masks[v, 0]) for v in (1, 2))  # a draw can be near-identity
    rng = np.random.default_rng(0)
    draws = [bank.draw(rng, 2) for _ in range(20)]
    assert all(d["view_s"] != d["view_t"] for d in draws)  # the target's draw is never the support's
    outs = [PairAugment(rng)(image, label[None].float()) for _ in range(4)]
    assert all(o.shape == image.shape and m.shape == (1, 48, 64) for o, m in outs)


def test_sampler_refuses_a_single_study():
    s = Sample(torch.zeros(1, 8, 8), torch.ones(8, 8, dtype=torch.long), "vol.nii.gz#2:0")
    t = Sample(torch.zeros(1, 8, 8), torch.ones(8, 8, dtype=torch.long), "vol.nii.gz#2:1")
    with pytest.raises(ValueError, match="at least 2 samples from different studies"):
        EpisodeSampler([s, t], [1], num_support=1)


def test_in_volume_support_takes_other_slices_of_the_same_study_or_the_slice_itself():
    """The user's drawn slices of the volume being segmented (`same_study`): supports are the other drawn slices;
    a single drawn slice supports itself (EpisodeBank then gives it another augmented view)."""
    slices = [Sample(torch.zeros(1, 8, 8), torch.ones(8, 8, dtype=torch.long), f"vol.nii.gz#2:{z}") for z in range(3)]
    sampler = EpisodeSampler(slices, [1], num_support=2, same_study=True)
    rng = np.random.default_rng(0)
    for _ in range(10):
        d = sampler.draw(rng)
        assert d.target not in d.support and len(d.support) == 2
    single = EpisodeSampler(slices[:1], [1], num_support=2, same_study=True).draw(rng)
    assert single.target == 0 and single.support == [0]


def test_episodes_come_from_the_banks_in_the_weighted_shares():
    """Bank weights set each bank's share of the episodes (a family keeps its share however many banks it has);
    without weights the draw is uniform, as before weights existed; bad weights are refused."""
    from ppgseg.training.episodes import EpisodeDataset

    class Bank:  # what EpisodeDataset asks of a bank: an episode drawn with its random generator
        def draw(self, rng, num_support):
            return {"target": int(rng.integers(10))}

    banks = [Bank(), Bank(), Bank()]
    weighted = EpisodeDataset(banks, 1, 6000, seed=1, bank_weights=[6, 3, 1])
    counts = np.bincount([weighted[i]["bank"] for i in range(len(weighted))], minlength=3) / len(weighted)
    assert np.allclose(counts, [0.6, 0.3, 0.1], atol=0.02), counts
    uniform = EpisodeDataset(banks, 1, 3000, seed=1)
    counts = np.bincount([uniform[i]["bank"] for i in range(len(uniform))], minlength=3) / len(uniform)
    assert np.allclose(counts, 1 / 3, atol=0.03), counts
    for bad in ([1, 1], [1, -1, 1], [0, 0, 0]):
        with pytest.raises(ValueError, match="bank_weights must be 3 non-negative"):
            EpisodeDataset(banks, 1, 10, bank_weights=bad)


def test_bank_features_kept_on_disk_equal_the_computed_ones_and_are_not_computed_again(tmp_path):
    """A bank over the same pixels and encoder weights reads its features back instead of encoding (a resumed run);
    other encoder weights are other features."""
    from ppgseg import build_model
    from ppgseg.training import EpisodeBank

    torch.manual_seed(0)
    model = build_model("sam_tiny", "tiny", pretrained=False, lora_sites=("decoder",))
    assert not model.encoder_trains
    label = torch.zeros(48, 64, dtype=torch.long)
    label[10:30, 15:35] = 1
    samples = [Sample(torch.rand(3, 48, 64) * 255, label, f"s{i}") for i in range(3)]
    calls = []
    encode = model.backbone.encode
    model.backbone.encode = lambda x: calls.append(len(x)) or encode(x)
    plain = EpisodeBank(model, samples, [1], views=2, seed=0)
    first = EpisodeBank(model, samples, [1], views=2, seed=0, feature_cache=tmp_path)
    assert len(calls) == 12 and len(list(tmp_path.glob("*.pt"))) == 2  # 3 images x 2 views, twice; a file a view
    again = EpisodeBank(model, samples, [1], views=2, seed=0, feature_cache=tmp_path)
    assert len(calls) == 12
    for v in range(2):
        torch.testing.assert_close(again.cache[v].embed, plain.cache[v].embed)
        torch.testing.assert_close(first.cache[v].embed, plain.cache[v].embed)
    with torch.no_grad():
        next(model.backbone.model.image_encoder.parameters()).add_(1.0)
    EpisodeBank(model, samples, [1], views=2, seed=0, feature_cache=tmp_path)
    assert len(calls) == 18 and len(list(tmp_path.glob("*.pt"))) == 4
