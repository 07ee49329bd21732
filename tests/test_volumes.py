"""Volumes: supports per slice, the registration prompt, propagation from drawn slices, the peers and the protocol,
on generated volumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_model import tiny_model

from ppgseg.evaluation.baselines.volume import interpolate_slices, nearest_copy, registered_slices
from ppgseg.evaluation.volumes import dice, drawn_positions
from ppgseg.inference.atlas import AtlasRegistration, Registered, atlas_slice, carry_between, fuse, to_sitk
from ppgseg.inference.volume import (
    LabelledSlices,
    encode_volume,
    one_component,
    position_supports,
    propagate,
    segment_slices,
)


def ellipsoid(shape=(40, 36, 24), centre=(20, 18, 12), radii=(10, 8, 7), seed=0, two_labels=True):
    """A bright ellipsoid in noise on a darker body, (X, Y, Z); label 1 its lower half along x, 2 the upper."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    r = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, radii, strict=True))
    inside = r <= 1
    body = sum(((g - s / 2) / (s / 2.2)) ** 2 for g, s in zip(grid, shape, strict=True)) <= 1
    image = 40.0 * body + 120.0 * inside + rng.normal(0, 6, shape)
    label = inside.astype(np.uint8)
    if two_labels:
        label[inside & (grid[0] >= centre[0])] = 2
    return torch.from_numpy(image).float(), torch.from_numpy(label)


# --- supports at the slice's position ----------------------------------------------------------------------------
def test_supports_come_from_the_matching_position():
    """Two labelled studies, the second shifted by 3 slices: each target slice's supports are the slices the
    alignment maps it to (within the window), the most similar first, one study after the other."""
    z, c = 12, 8
    vectors = torch.nn.functional.normalize(torch.randn(z, c), dim=1)  # one feature vector per anatomical position
    rows = []
    for study, shift in enumerate((0, 3)):
        idx = torch.arange(z)
        anat = (idx - shift).clamp(0, z - 1)  # study slice i shows anatomical position i - shift
        rows.append(LabelledSlices(torch.zeros(z, 3, 4, 4), torch.zeros(z, 1, 4, 4), torch.zeros(z, c, 2, 2),
                                   vectors[anat], torch.full((z,), study), idx))  # fmt: skip
    bank = LabelledSlices.cat(rows)
    at = torch.stack([torch.arange(z), (torch.arange(z) + 3)], dim=1)  # target slice z -> study slices z, z + 3
    chosen = position_supports(bank, at, vectors, window=2, count=4)
    for t in range(2, z - 5):
        got = chosen[t]
        assert len(got) == 4
        studies = [int(bank.study[r]) for r in got]
        assert sorted(studies[:2]) == [0, 1] and sorted(studies[2:]) == [0, 1]  # taken in turns over the studies
        first = {int(bank.study[r]): int(bank.index[r]) for r in got[:2]}
        assert first == {0: t, 1: t + 3}  # each study's best: the exact position
        assert all(abs(int(bank.index[r]) - int(at[t, bank.study[r]])) <= 2 for r in got)
    far = torch.full((z, 2), 100)
    assert position_supports(bank, far, vectors) == [[]] * z  # no study reaches: no supports


# --- registration ------------------------------------------------------------------------------------------------
def test_registration_with_the_target_as_atlas_returns_the_atlas_and_moves_a_shifted_one():
    image, label = ellipsoid()
    reg = AtlasRegistration(affine_iterations=50, demons_iterations=20)
    fused, done = reg(image, [(image, label)], [1, 2])
    assert dice(fused, label, [1, 2])[1] > 0.95 and dice(fused, label, [1, 2])[2] > 0.95
    assert atlas_slice(done[0], image.shape, 2, 7) == 7  # the identity maps a slice to itself
    moved_image, moved_label = (torch.roll(a, (3, -2, 2), dims=(0, 1, 2)) for a in ellipsoid(seed=1))  # positioned
    fused, done = reg(image, [(moved_image, moved_label)], [1, 2])
    before = dice(moved_label, label, [1, 2])
    after = dice(fused, label, [1, 2])
    assert min(before.values()) < 0.75 and min(after.values()) > 0.85, (before, after)
    assert abs(atlas_slice(done[0], image.shape, 2, 12) - 14) <= 1  # target slice 12 is the atlas's slice 14
    with pytest.raises(ValueError, match="atlases is empty"):
        reg(image, [], [1, 2])
    with pytest.raises(ValueError, match="3D"):
        to_sitk(image[0])


def test_fuse_is_a_majority_vote_with_background_or_a_locally_weighted_one():
    a = np.zeros((2, 2, 1, 1), np.float32)
    a[0, 0], a[1, 1] = 1, 0.9
    b = np.zeros_like(a)
    b[0, 0] = 1
    c = np.zeros_like(a)
    equal = [Registered(f, None) for f in (a, b, c)]
    assert fuse(equal, [1, 2])[:, 0, 0].tolist() == [1, 0]  # 2 of 3 say 1; 1 of 3 says 2, 2 say background
    trust_c_at_0 = np.array([1.0, 1.0])[:, None, None], np.array([1.0, 1.0])[:, None, None], np.array([5.0, 1.0])
    weighted = [Registered(f, None, w.reshape(2, 1, 1)) for f, w in zip((a, b, c), trust_c_at_0, strict=True)]
    assert fuse(weighted, [1, 2])[:, 0, 0].tolist() == [0, 0]  # c outweighs a and b at voxel 0


def test_local_fusion_trusts_the_atlas_whose_registered_image_matches():
    """Two atlases in place disagree: the one whose image matches the target wins where they disagree (locally
    weighted voting), where an equal vote of two cannot side with it."""
    image, label = ellipsoid()
    noisy = image + torch.from_numpy(np.random.default_rng(0).normal(0, 60, image.shape)).float()
    atlases = [(image, label), (noisy, torch.roll(label, 4, dims=0))]
    local = AtlasRegistration(deformable=False, affine_iterations=1)
    majority = AtlasRegistration(deformable=False, affine_iterations=1, fusion="majority")
    fused, done = local(image, atlases, [1, 2])
    assert float(done[0].weight.mean()) > 10 * float(done[1].weight.mean())
    assert min(dice(fused, label, [1, 2]).values()) > 0.95
    tied, done = majority(image, atlases, [1, 2])
    assert done[0].weight is None and min(dice(tied, label, [1, 2]).values()) < 0.9
    with pytest.raises(ValueError, match="fusion must be one of"):
        AtlasRegistration(fusion="staple")


# --- the registration prompt -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coarse_model():
    """A tiny model whose output is the dense-slot masks themselves (the `coarse` route: no decoder)."""
    return tiny_model(prompt="coarse", lora_sites=("decoder",))


def test_registration_prompt_with_a_perfect_atlas_returns_the_atlas(coarse_model):
    image, label = ellipsoid(shape=(32, 28, 10), centre=(16, 14, 5), radii=(9, 7, 6))
    vol = encode_volume(coarse_model, image[None], axis=2)
    assert vol.x.shape[0] == 10 and vol.size == (32, 28)
    bank = LabelledSlices.of(coarse_model, vol, label, [1, 2], axis=2)
    prior = torch.stack([label == 1, label == 2]).float().permute(3, 0, 1, 2)  # (Z, N, X, Y)
    supports = [[z] for z in range(10)]
    out = segment_slices(coarse_model, vol, bank, supports, [1, 2], prior=prior)
    truth = label.permute(2, 0, 1)
    d = dice(out, truth, [1, 2])
    assert d[1] > 0.9 and d[2] > 0.9, d
    empty = segment_slices(coarse_model, vol, bank, supports, [1, 2], prior=torch.zeros_like(prior))
    assert not empty.any()  # a prior that shows nothing asks for nothing


def test_propagation_copies_through_the_dense_slot_and_stops_at_a_not_here_slice(coarse_model):
    """With the `coarse` route each slice gets its nearest labelled neighbour's masks: propagation carries the drawn
    masks outward slice by slice, and an all-zero drawn slice ("not here") ends the object on its side."""
    image, label = ellipsoid(shape=(32, 28, 12), centre=(16, 14, 6), radii=(9, 7, 9), two_labels=False)
    vol = encode_volume(coarse_model, image[None], axis=2)
    slices = label.permute(2, 0, 1)
    drawn = {5: slices[5], 9: torch.zeros_like(slices[9])}
    out = propagate(coarse_model, vol, drawn, [1])
    assert out.shape == (12, 32, 28)
    for z in range(0, 8):  # below 5 and up to the middle: slice 5's mask, carried (nearest on a tie: the lower)
        assert dice(out[z], slices[5], [1])[1] > 0.95, z
    assert not out[8:].any()  # from the "not here" slice outward: nothing
    with pytest.raises(ValueError, match="outside the volume"):
        propagate(coarse_model, vol, {12: slices[0]}, [1])
    with pytest.raises(ValueError, match="drawn is empty"):
        propagate(coarse_model, vol, {}, [1])


def test_propagation_with_the_slices_registers_each_neighbour_onto_the_next_slice(coarse_model):
    """A disc that moves 1.5 voxels per slice: carried by 2D registration of each slice onto the next (``slices``),
    the drawn mask follows it; copied (no ``slices``), it stays where it was drawn."""
    z_all, size = 9, (40, 40)
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    truth = torch.stack([((yy - 20) ** 2 + (xx - 8 - 1.5 * z) ** 2 <= 36).to(torch.uint8) for z in range(z_all)])
    g = torch.Generator().manual_seed(0)
    image = 30.0 + 120.0 * truth.float() + 4 * torch.randn(truth.shape, generator=g)  # (Z, H, W)
    vol = encode_volume(coarse_model, image.permute(1, 2, 0)[None], axis=2)
    drawn = {4: truth[4]}
    keep = torch.ones(z_all, dtype=torch.bool)
    keep[4] = False
    copied = propagate(coarse_model, vol, drawn, [1])
    warped = propagate(coarse_model, vol, drawn, [1], slices=image)
    d_copy, d_warp = (dice(p[keep], truth[keep], [1])[1] for p in (copied, warped))
    assert d_warp > max(0.85, d_copy + 0.2), (d_copy, d_warp)
    peer = registered_slices(drawn, image, [1])  # the same carrying with no model: the protocol's peer
    assert dice(peer[keep], truth[keep], [1])[1] > max(0.85, d_copy + 0.2)


def test_one_component_keeps_the_largest_3d_component_per_label():
    lab = torch.zeros(10, 10, 10, dtype=torch.uint8)
    lab[1:5, 1:5, 1:5] = 1
    lab[8:, 8:, 8:] = 1  # a stray island
    lab[6:8, 1:3, 1:3] = 2
    out = one_component(lab, [1, 2])
    assert out[1:5, 1:5, 1:5].eq(1).all() and not out[8:, 8:, 8:].any() and out[6:8, 1:3, 1:3].eq(2).all()


# --- drawn-slice peers -------------------------------------------------------------------------------------------
def test_interpolation_and_nearest_copy_between_drawn_slices():
    yy, xx = torch.meshgrid(torch.arange(30), torch.arange(30), indexing="ij")
    radius = [1.0 + 0.6 * z for z in range(21)]  # a cone: the disk grows slice by slice
    slices = torch.stack([((yy - 15) ** 2 + (xx - 15) ** 2 <= r**2).to(torch.uint8) for r in radius])
    label = slices.permute(1, 2, 0)
    zs = drawn_positions(label, 2, 3)
    assert zs == [5, 10, 15]  # spread over the object's extent 0..20
    drawn = {z: slices[z] for z in zs}
    keep = torch.ones(21, dtype=torch.bool)
    keep[zs] = False
    inter = interpolate_slices(drawn, 21, [1])
    copy = nearest_copy(drawn, 21)
    assert torch.equal(copy[7], slices[5]) and torch.equal(copy[8], slices[10])
    assert not inter[:5].any() and not inter[16:].any()  # nothing outside the drawn range
    d_inter = dice(inter[5:16], slices[5:16], [1])[1]
    d_copy = dice(copy[5:16], slices[5:16], [1])[1]
    assert d_inter > 0.95 and d_inter > d_copy, (d_inter, d_copy)


def test_slice_registration_carries_from_both_drawn_ends_and_an_object_ends_halfway_to_a_not_here_slice():
    """A disc that moves 1.5 voxels per slice, drawn on slices 2 and 10: every slice between gets it from both ends
    and follows it. Drawn on 2 and erased on 6 ("not here"): it is kept on slice 3, where slice 2's chain weighs
    three quarters, and gone from the halfway slice 4 on; below slice 2 it goes on."""
    z_all, size = 13, (40, 48)
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    truth = torch.stack([((yy - 20) ** 2 + (xx - 6 - 1.5 * z) ** 2 <= 36).to(torch.uint8) for z in range(z_all)])
    g = torch.Generator().manual_seed(0)
    image = 30.0 + 120.0 * truth.float() + 4 * torch.randn(truth.shape, generator=g)
    both = registered_slices({2: truth[2], 10: truth[10]}, image, [1])
    for z in range(3, 10):
        assert dice(both[z], truth[z], [1])[1] > 0.85, z
    fractions = carry_between(image.numpy(), {2: truth[2][None].float().numpy(), 10: truth[10][None].float().numpy()})
    assert fractions.shape == (z_all, 1, *size) and np.array_equal(fractions[2, 0], truth[2].numpy())
    ended = registered_slices({2: truth[2], 6: torch.zeros_like(truth[6])}, image, [1])
    assert dice(ended[3], truth[3], [1])[1] > 0.85 and dice(ended[1], truth[1], [1])[1] > 0.85
    assert not ended[4:].any()


# --- the protocol end to end -------------------------------------------------------------------------------------
def test_volume_protocol_runs_every_method_resumes_and_reports(tmp_path, coarse_model):
    import nibabel as nib

    from ppgseg.evaluation.volume_report import write_volume_report
    from ppgseg.evaluation.volumes import VolumeProtocol

    folder = tmp_path / "vols"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    items = []
    for i in range(4):
        image, label = ellipsoid(shape=(24, 20, 8), centre=(12 + i % 2, 10, 4), radii=(7, 6, 5), seed=i)
        for kind, arr in (("images", image.numpy()), ("labels", label.numpy())):
            nib.save(nib.Nifti1Image(arr, np.eye(4)), folder / kind / f"s{i}.nii.gz")
        items.append({"image": f"images/s{i}.nii.gz", "label": f"labels/s{i}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({
        "name": "vols", "labels": {"0": "background", "1": "front", "2": "back"},
        "training": items[:2], "test": items[2:],
    }))  # fmt: skip
    out = tmp_path / "out"
    reg = AtlasRegistration(affine_iterations=10, demons_iterations=5)
    protocol = VolumeProtocol(coarse_model, folder, out, ks=(1, 2), drawn=(2,), limit=1, unet_seconds=1.0,
                              cache_dir=tmp_path / "cache", registration=reg)  # fmt: skip
    results = protocol.run()
    study = results["studies"]["s2"]
    assert set(study["studies"]) == {"registration", "registration_local", "ppg_fixed_supports",
                                     "ppg_position_supports", "ppg_registration_prompt", "unet3d",
                                     "litemedsam_gt_box"}  # fmt: skip
    assert results["fusion"] == "local"
    assert set(study["drawn"]) == {"nearest_slice_copy", "interpolation", "slice_registration",
                                   "ppg_drawn_fixed_supports", "ppg_propagation"}  # fmt: skip
    assert set(study["studies"]["registration"]) == {"1", "2"}
    assert study["studies"]["registration"]["2"]["front"] > 0.7  # similar ellipsoids register well
    # resumed: the second test study is added, the first one is not run again
    again = VolumeProtocol(coarse_model, folder, out, ks=(1, 2), drawn=(2,), unet_seconds=0, registration=reg,
                           cache_dir=tmp_path / "cache")  # fmt: skip
    done = []
    again.from_studies = lambda s, *a: done.append(s.id) or {}
    again.from_drawn = lambda s: {}
    again.run()
    assert done == ["s3"]
    results = json.loads((out / "results.json").read_text())
    results["studies"].pop("s3")
    report = write_volume_report(results, out)
    text = report.read_text()
    assert "multi-atlas registration" in text and "PPG propagation" in text and "## Targets" in text
    assert (out / "dice_vs_k.png").is_file() and (out / "overlays.png").is_file()
    # a run of one mode only (--ks or --drawn with no value) reports that mode alone
    studies_only = {**results, "drawn": [], "studies": {s: {**r, "drawn": {}} for s, r in results["studies"].items()}}
    text = write_volume_report(studies_only, tmp_path / "studies_only").read_text()
    assert "## Labelled studies" in text and "## Drawn slices" not in text and "PPG propagation" not in text
    drawn_only = {**results, "ks": [], "studies": {s: {**r, "studies": {}} for s, r in results["studies"].items()}}
    text = write_volume_report(drawn_only, tmp_path / "drawn_only").read_text()
    assert "## Labelled studies" not in text and "PPG propagation" in text


# --- the bundle's folder inference ---------------------------------------------------------------------------------
def write_studies(folder, studies, split="training"):
    """Volumes and label maps as NIfTI in a data-contract folder (1 mm voxels)."""
    import nibabel as nib

    entries = []
    for name, (image, label) in studies.items():
        for kind, arr in (("images", image.numpy()), ("labels", label.numpy())):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, np.eye(4)), folder / kind / f"{name}.nii.gz")
        entries.append({"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"})
    labels = (
        {"0": "background", "1": "lower", "2": "upper"}
        if any(lab.max() > 1 for _, lab in studies.values())
        else {"0": "background", "1": "object"}
    )
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, split: entries, "test": []}))


def test_folder_inference_registers_the_labelled_studies_onto_each_volume(tmp_path, coarse_model):
    """The bundle's inference with ``atlases``: labelled volumes in the support folder are registered onto each
    input volume and prompt it slice by slice. Through the `coarse` route the answer is their registered vote: it
    must be that vote and follow the object where it moved, far better than either study as it lies; the support
    set alone (atlases 0) answers otherwise. A support folder of 2D images leaves volumes to the support set."""
    from PIL import Image

    from ppgseg.inference import FolderSegmenter, SupportSet
    from ppgseg.io import read_image

    shape, radii = (40, 36, 20), (10, 8, 6)
    studies = {f"s{i}": ellipsoid(shape=shape, centre=c, radii=radii, seed=i, two_labels=False)
               for i, c in enumerate([(18, 17, 9), (21, 19, 10)])}  # fmt: skip
    write_studies(tmp_path / "support", studies)
    image, truth = ellipsoid(shape=shape, centre=(22, 16, 11), radii=radii, seed=5, two_labels=False)
    write_studies(tmp_path / "target", {"t": (image, truth)})
    registration = AtlasRegistration(affine_iterations=50, demons_iterations=20)
    out = {}
    for atlases in (2, 0):
        seg = FolderSegmenter(coarse_model, SupportSet(tmp_path / "support", 2), atlases=atlases,
                              registration=registration)  # fmt: skip
        report = seg([tmp_path / "target/images/t.nii.gz"], tmp_path / f"out{atlases}")
        assert not report["failed"], report
        out[atlases] = read_image(next(iter(report["written"].values()))).as_tensor()[0].round().long()
        assert out[atlases].shape == shape
    fused, _ = registration(image, list(studies.values()), [1])
    assert dice(out[2], fused, [1])[1] > 0.9
    as_they_lie = max(dice(lab, truth, [1])[1] for _, lab in studies.values())
    assert dice(out[2], truth, [1])[1] > max(0.78, as_they_lie + 0.1), (dice(out[2], truth, [1]), as_they_lie)
    assert not torch.equal(out[2], out[0])
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "flat/a.png")
    entry = {"image": "a.png", "label": "a.png"}
    (tmp_path / "flat/dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a"}, "training": [entry]}))
    flat = FolderSegmenter(coarse_model, SupportSet(tmp_path / "support", 2), atlases=2)
    flat.support.folder = tmp_path / "flat"
    assert flat.atlases() == []


# --- the registration route's on-the-fly fine-tune ------------------------------------------------------------------
def generated_atlases(model, count=3, shape=(32, 28, 10)):
    from ppgseg.inference.volume import Atlas

    out = []
    for i in range(count):
        image, label = ellipsoid(shape=shape, centre=(15 + i, 13 + i % 2, 5), radii=(9, 7, 6), seed=i)
        out.append(Atlas(image[None], label, encode_volume(model, image[None], axis=2)))
    return out


def episode_dice(model, data) -> float:
    """Mean Dice of the decoder's masks over every episode of ``data`` against its truth (eval mode)."""
    with torch.no_grad():
        model.eval()
        scores = []
        for item in range(len(data)):
            logits, truth = data.logits(model, item)
            p = logits > 0
            scores.append(float(2 * (p & (truth > 0)).sum() / (p.sum() + truth.sum()).clamp_min(1)))
        return float(np.mean(scores))


def test_registered_episodes_prompt_each_study_with_the_others_only():
    """Leave one out: study i's slices get supports from the other studies only, at their registered position, and
    the prior is the others' vote; a slice is an episode only where that vote asks for an object."""
    from ppgseg.training.registered import RegisteredEpisodes, cross_register

    model = tiny_model(lora_sites=("decoder",))
    atlases = generated_atlases(model)
    registered = cross_register(AtlasRegistration(affine_iterations=20, demons_iterations=5), atlases, [1, 2])
    assert [len(r) for r in registered] == [2, 2, 2]
    data = RegisteredEpisodes(model, atlases, registered, [1, 2], axis=2)
    assert data.priors[0].shape == (10, 2, 128, 128)  # the encoder frame
    for i, z in data.items:
        rows = data.supports[i][z]
        assert rows and all(int(data.bank.study[r]) != i for r in rows)
        assert all(abs(int(data.bank.index[r]) - z) <= 3 for r in rows)  # near the same position (similar studies)
        assert bool((data.priors[i][z].flatten(1).amax(1) >= 0.5).any())
    covered = {z for i, z in data.items if i == 0}
    shows = atlases[0].label.permute(2, 0, 1).flatten(1).amax(1) > 0
    assert covered and covered <= set(range(10)) and len(covered) >= int(shows.sum()) - 2
    logits, truth = data.logits(model, 0)
    assert logits.shape == truth.shape and logits.shape[:2] == (1, int(truth.shape[1]))
    with pytest.raises(ValueError, match="at least 2 labelled studies"):
        cross_register(AtlasRegistration(), atlases[:1], [1, 2])


def test_registration_finetune_learns_to_refine_the_registered_vote():
    """Learning on small data: 200 episodes lower the loss of fixed episodes and lift the Dice of the
    decoder's masks against each study's own labels; only trainable weights change, and the coarse route (nothing
    to train between prior and output) is refused."""
    from ppgseg.training.registered import RegisteredEpisodes, RegistrationFineTune, cross_register

    model = tiny_model(lora_sites=("decoder",))
    atlases = generated_atlases(model)
    registered = cross_register(AtlasRegistration(affine_iterations=20, demons_iterations=5), atlases, [1, 2])
    data = RegisteredEpisodes(model, atlases, registered, [1, 2], axis=2)
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    before = episode_dice(model, data)
    done = RegistrationFineTune(episodes=200, lr=3e-3, checks=8)(model, data)
    after = episode_dice(model, data)
    assert done.kept and done.episodes == 200 and done.after < done.before, done
    assert after > max(0.5, before + 0.3), (before, after)  # 0.12 -> 0.67 at this seed
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in frozen.items())
    assert "registration fine-tune on 3 labelled studies" in done.describe("base", 3)
    coarse = tiny_model(prompt="coarse", lora_sites=("decoder",))
    with pytest.raises(ValueError, match="no decoder"):
        RegistrationFineTune(episodes=1)(coarse, RegisteredEpisodes(coarse, atlases, registered, [1, 2], axis=2))


def test_folder_inference_fine_tunes_the_registration_route_once_and_keeps_the_weights_it_was_given(tmp_path):
    """The bundle's inference with ``tune``: the weights for the registration route are trained once on the labelled
    studies of the support folder (two volumes here), used for every volume, and the model keeps the weights it was
    given for anything else."""
    from ppgseg.checkpoint import trainable_state
    from ppgseg.inference import FolderSegmenter, SupportSet
    from ppgseg.training.registered import RegistrationFineTune

    model = tiny_model(lora_sites=("decoder",))
    shape, radii = (32, 28, 10), (9, 7, 4)
    studies = {f"s{i}": ellipsoid(shape=shape, centre=(15 + i, 14, 5), radii=radii, seed=i) for i in range(2)}
    write_studies(tmp_path / "support", studies)
    write_studies(tmp_path / "target", {f"t{i}": ellipsoid(shape=shape, radii=radii, centre=(16, 13 + i, 5), seed=9 + i)
                                        for i in range(2)})  # fmt: skip
    given = {k: v.clone() for k, v in trainable_state(model).items()}
    seg = FolderSegmenter(model, SupportSet(tmp_path / "support", 2), atlases=2, tune=RegistrationFineTune(episodes=4),
                          registration=AtlasRegistration(affine_iterations=20, demons_iterations=5))  # fmt: skip
    report = seg(sorted((tmp_path / "target" / "images").glob("*.nii.gz")), tmp_path / "out")
    assert not report["failed"] and len(report["written"]) == 2
    assert seg._tuned is not None and any(not torch.equal(seg._tuned[k], v) for k, v in given.items())
    assert all(torch.equal(v, given[k]) for k, v in trainable_state(model).items())


# --- propagation trained offline on labelled volumes ----------------------------------------------------------------
def test_propagation_episodes_take_the_slices_nearer_the_drawn_ones_as_supports_and_learn():
    """Each study's drawn slices are at `drawn_positions`; an episode is a slice the carried masks reach, prompted by
    labelled slices nearer the drawn ones than it (drawn: their truth; others: the carried masks), the carried
    fractions in the dense slot. Learning on small data: 100 episodes lower the loss of fixed episodes and lift the
    decoder's Dice; only trainable weights change."""
    from ppgseg.training.propagation import PropagationEpisodes
    from ppgseg.training.registered import RegistrationFineTune

    model = tiny_model(lora_sites=("decoder",))
    atlases = generated_atlases(model, count=2)
    data = PropagationEpisodes(
        model, [a.encoded for a in atlases], [a.image[0] for a in atlases], [a.label for a in atlases], [1, 2], 2
    )
    for s, a in enumerate(atlases):
        zs = drawn_positions(a.label, 2, 3)
        mine = [(z, near) for t, z, near in data.items if t == s]
        assert mine and all(z not in zs for z, _ in mine)
        for z, near in mine:
            gap = min(abs(z - d) for d in zs)
            assert len(near) == 3 and all(min(abs(y - d) for d in zs) < gap for y in near)
        framed = data.truth[s]
        for z in zs:  # a drawn slice is a support with its own truth
            assert torch.equal(data.masks[s][z], framed[z])
    logits, truth = data.logits(model, 0)
    assert logits.shape == truth.shape and logits.shape[0] == 1
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    before = episode_dice(model, data)
    done = RegistrationFineTune(episodes=100, lr=3e-3, checks=8)(model, data)
    after = episode_dice(model, data)
    assert done.kept and done.after < done.before, done
    assert after > before + 0.12, (before, after)  # 0.12 -> 0.29 at this seed
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in frozen.items())
    with pytest.raises(ValueError, match="label is empty"):
        drawn_positions(torch.zeros(8, 8, 8), 2, 3)
