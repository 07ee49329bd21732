"""SAM 2 video mode with a random SAM 2 (sam2's classes, its tiny config at 256 px): the proxy prompt in memory
attention, propagation both ways, switching target, and what trains."""

from __future__ import annotations

import pytest
import torch

from ppgseg.build import build_model
from ppgseg.lora import is_trainable
from ppgseg.modeling.proxy_sam2_video import ProxyPromptVideo


@pytest.fixture(scope="module")
def video_model() -> ProxyPromptVideo:
    torch.manual_seed(0)
    return build_model("sam2", "tiny", pretrained=False, backbone_kwargs={"image_size": 256}, video=True)


def boxes_mask(*boxes: tuple[int, int, int, int]) -> torch.Tensor:
    """(1, N, 256, 256): one rectangle (y0, y1, x0, x1) per object."""
    m = torch.zeros(1, len(boxes), 256, 256)
    for n, (y0, y1, x0, x1) in enumerate(boxes):
        m[0, n, y0:y1, x0:x1] = 1
    return m


@pytest.fixture(scope="module")
def clip(video_model):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 3, 256, 256, generator=g)
    with torch.no_grad():
        frames = video_model.encode_frames(x)
        two = video_model.video_support(
            torch.rand(1, 3, 256, 256, generator=g), boxes_mask((40, 90, 40, 90), (150, 200, 100, 220))
        )
        one = video_model.video_support(torch.rand(1, 3, 256, 256, generator=g), boxes_mask((60, 160, 60, 160)))
    return frames, two, one


def test_both_directions_from_the_support_frame(video_model, clip, monkeypatch):
    frames, two, _ = clip
    calls = []
    track = video_model.sam2.track_step

    def spy(**kw):
        calls.append(
            (kw["frame_idx"], kw["track_in_reverse"] if "track_in_reverse" in kw else None, kw["is_init_cond_frame"])
        )
        return track(**kw)

    monkeypatch.setattr(video_model.sam2, "track_step", spy)
    with torch.no_grad():
        out = video_model.segment_video(frames, {2: two})
    assert [tuple(o.shape) for o in out] == [(2, 64, 64)] * 5 and all(torch.isfinite(o).all() for o in out)
    assert calls == [(2, False, False), (3, False, False), (4, False, False), (1, True, False), (0, True, False)]


def test_memory_holds_support_then_own_frames_then_the_prompt(video_model, clip):
    frames, two, _ = clip
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs["memory"].shape[0], kwargs["num_obj_ptr_tokens"], kwargs["memory"][-256:].clone()))

    handle = video_model.sam2.memory_attention.attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            video_model.propagate(frames, two, 0, 3)
            prompt_tokens, _ = video_model.frame_prompt(frames, 2, two)
    finally:
        handle.remove()
    hw = 16 * 16  # SAM 2's memory tokens per frame at 256 px
    t = prompt_tokens.shape[0]
    for i, (length, excluded, _) in enumerate(seen):
        spatial = length - excluded
        assert spatial == (1 + i) * hw  # the support memory, then the frames predicted so far (RoPE-able)
        assert excluded > t  # object pointers + the prompt tokens are kept out of RoPE
    assert torch.allclose(seen[2][2][-t:], prompt_tokens, atol=1e-6)  # the prompt is the memory's tail


def test_switching_target_mid_clip_starts_a_new_memory(video_model, clip):
    frames, two, one = clip
    with torch.no_grad():
        out = video_model.segment_video(frames, {0: two, 3: one})
        alone = video_model.segment_video(frames, {3: one})
    assert [o.shape[0] for o in out] == [2, 2, 2, 1, 1]
    for f in (3, 4):
        assert torch.equal(out[f], alone[f])
    with pytest.raises(ValueError, match="support frames"):
        video_model.segment_video(frames, {5: one})


def test_support_masks_steer_the_prediction(video_model, clip):
    """Which object is propagated is the support mask's doing: the same support image with its two masks swapped gives
    the two objects' masks swapped on every frame (to 1e-4), while the two objects' masks differ by more than that."""
    frames, _, _ = clip
    g = torch.Generator().manual_seed(5)
    image, masks = torch.rand(1, 3, 256, 256, generator=g), boxes_mask((40, 90, 40, 90), (150, 220, 120, 230))
    with torch.no_grad():
        a = video_model.segment_video(frames, {0: video_model.video_support(image, masks)})
        b = video_model.segment_video(frames, {0: video_model.video_support(image, masks[:, [1, 0]])})
    for f in range(1, len(a)):
        torch.testing.assert_close(b[f], a[f][[1, 0]], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(a[f][0], a[f][1], atol=1e-4, rtol=1e-4)  # distinguishable at that precision


def test_gradients_reach_only_ppg_memory_prompt_and_lora(video_model, clip):
    frames, two, _ = clip
    video_model.train()
    video_model.zero_grad()
    out = video_model.propagate(
        frames, video_model.video_support(torch.rand(1, 3, 256, 256), boxes_mask((40, 90, 40, 90))), 0, 2
    )
    torch.stack(list(out.values())).sigmoid().mean().backward()
    video_model.eval()
    grads = {n for n, p in video_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(is_trainable(n) for n in grads)
    assert any(n.startswith("memory_prompt.") for n in grads) and any(n.startswith("generator.") for n in grads)
    assert not any(p.requires_grad for n, p in video_model.named_parameters() if not is_trainable(n))


def test_video_mode_needs_sam2_and_its_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="video mode needs backbone='sam2'"):
        build_model("sam_tiny", "tiny", video=True)
    with pytest.raises(FileNotFoundError, match="sam2 release"):
        build_model("sam2", "tiny", checkpoint=str(tmp_path / "sam2.1_hiera_tiny.pt"), video=True)


# --- clips and video episodes ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_videos(tmp_path_factory):
    from ppgseg.data.video import write_demo_videos

    return write_demo_videos(tmp_path_factory.mktemp("videos"), n_train=3, n_val=1, n_test=1, frames=4, seed=3)


def test_demo_videos_group_into_ordered_clips_split_by_subject(demo_videos):
    from ppgseg.data.video import load_clips

    train, test = load_clips(demo_videos, "training"), load_clips(demo_videos, "test")
    assert len(train) == 3 and len(test) == 1 and not {c.name for c in train} & {c.name for c in test}
    clip = train[0]
    assert clip.frames.shape == (4, 1, 256, 256) and clip.masks([1, 2]).shape == (4, 2, 256, 256)
    heads = [float(torch.nonzero(clip.labels[f] == 2).float()[:, 0].mean()) for f in range(4)]
    assert heads == sorted(heads) and heads[-1] > heads[0]  # the fetal head descends frame by frame


def test_volume_slices_and_badly_named_frames(tmp_path):
    from ppgseg.data.contract import Sample
    from ppgseg.data.video import as_clips

    img, lab = torch.zeros(1, 8, 8), torch.ones(8, 8, dtype=torch.long)
    clips = as_clips([Sample(img + z, lab, f"/d/ct1.nii.gz#2:{z}") for z in (5, 3, 4)])
    assert len(clips) == 1 and [float(f.mean()) for f in clips[0].frames] == [3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="<video>_<frame>"):
        as_clips([Sample(img, lab, "/d/images/frame.png")])


def test_video_episodes_take_another_subjects_support_and_learn(video_model, demo_videos):
    import numpy as np
    from monai.losses import DiceLoss

    from ppgseg.data.video import load_clips
    from ppgseg.training import train_episodes
    from ppgseg.training.video import ClipBank, VideoEpisodeNet

    bank = ClipBank(video_model, load_clips(demo_videos, "training"), [1, 2], length=2)
    assert [len(f) for f in bank.frames] == [4, 4, 4] and bank.x[0].shape == (4, 3, 256, 256)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ep = bank.draw(rng)
        assert ep["support_clip"] != ep["target"] and ep["objects"]
    net = VideoEpisodeNet(video_model, bank)
    ep = bank.draw(np.random.default_rng(3))
    state = {k: v.clone() for k, v in video_model.state_dict().items()}
    opt = torch.optim.Adam([p for p in video_model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    net.train()
    for _ in range(8):
        logits, truth = net(ep)
        assert logits.shape == truth.shape == (2, len(ep["objects"]), 64, 64)
        loss = DiceLoss(sigmoid=True)(logits, truth)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.003 and all(b <= a + 1e-4 for a, b in zip(losses, losses[1:], strict=False))
    assert len(train_episodes(video_model, bank, steps=2, num_support=1, net=net)) == 2
    video_model.load_state_dict(state)  # leave the shared fixture as it was
    video_model.eval()


def test_video_baselines_run_in_the_same_harness(video_model, clip):
    from ppgseg.evaluation.baselines.video import first_frame_box_pass, mask_prompt_pass, pseudo_box_pass

    frames, two, _ = clip
    with torch.no_grad():
        ppg = video_model.propagate(frames, two, 0, 3)
        plain = mask_prompt_pass(video_model, frames, two, 0, 3)
        sgp = pseudo_box_pass(video_model, frames, two, 2, -1, reverse=True)
        boxed = first_frame_box_pass(video_model, frames, torch.tensor([[40.0, 40, 90, 90], [100, 150, 220, 200]]))
    for out, keys in ((ppg, [0, 1, 2]), (plain, [0, 1, 2]), (sgp, [2, 1, 0]), (boxed, [0, 1, 2, 3, 4])):
        assert list(out) == keys and all(v.shape == (2, 64, 64) and torch.isfinite(v).all() for v in out.values())
    assert not torch.allclose(ppg[1], plain[1])  # the proxy prompt is what differs


def test_video_training_through_the_bundle(demo_videos, tmp_path):
    from test_bundle import CONFIGS, bundle_run

    bundle_run(
        "training", "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'train_video.json'}']",
        "--dataset_dir", str(demo_videos), "--output_dir", str(tmp_path), "--episodes_per_epoch", "2",
        "--train#trainer#max_epochs", "1", "--clip_length", "2", "--preset", "tiny", "--pretrained", "False",
        "--backbone_kwargs", "{'image_size': 256}",
    )  # fmt: skip
    state = torch.load(tmp_path / "model_final.pt", map_location="cpu", weights_only=True)
    assert state["config"]["video"] and (tmp_path / "model.pt").is_file()  # best (validation) and final weights
    assert any(k.startswith("memory_prompt.") for k in state["state_dict"])
    assert all(k.startswith(("generator.", "memory_prompt.")) or ".lora_" in k for k in state["state_dict"])


def test_video_inference_through_the_bundle_on_frames_and_volumes(demo_videos, tmp_path):
    import nibabel as nib
    import numpy as np
    from PIL import Image
    from test_bundle import CONFIGS, bundle_run

    from ppgseg.data.generated.families import write_family

    frames_in = tmp_path / "frames"
    frames_in.mkdir()
    for p in sorted((demo_videos / "images").glob("us000_*.png"))[:3]:
        (frames_in / p.name).write_bytes(p.read_bytes())
    ct = write_family(tmp_path, "ct", n_train=2, n_val=0, n_test=1, seed=1)
    volumes_in = tmp_path / "volumes"
    volumes_in.mkdir()
    test_volume = sorted((ct / "images").glob("*.nii.gz"))[-1]
    (volumes_in / test_volume.name).write_bytes(test_volume.read_bytes())
    (volumes_in / "broken.nii.gz").write_text("not an image")
    common = ["--preset", "tiny", "--pretrained", "False", "--backbone_kwargs", "{'image_size': 256}"]
    files = f"['{CONFIGS / 'inference.json'}','{CONFIGS / 'inference_video.json'}']"
    for support, inputs, out in (
        (demo_videos, frames_in, tmp_path / "out_frames"),
        (ct, volumes_in, tmp_path / "out_ct"),
    ):
        extra = ["--start_fraction", "0.5"] if support == ct else []
        bundle_run(
            "run", "--config_file", files, "--support_dir", str(support), "--input_dir", str(inputs),
            "--output_dir", str(out), *common, *extra,
        )  # fmt: skip
    labels = sorted((tmp_path / "out_frames").glob("*.png"))
    assert [p.name for p in labels] == sorted(p.name for p in frames_in.glob("*.png"))
    assert np.array(Image.open(labels[0])).shape == (256, 256)
    src, seg = nib.load(test_volume), nib.load(tmp_path / "out_ct" / test_volume.name)
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
    report = (tmp_path / "out_ct" / "inference_report.json").read_text()
    assert "broken" in report and test_volume.name.split(".")[0] in report


def test_label_app_service_propagates_volumes_with_sam2(video_model, tmp_path):
    import nibabel as nib

    from ppgseg.data.generated.families import write_studies
    from ppgseg.io import read_image
    from ppgseg.serving import ProxyPromptService, Study, VideoSegmenter

    folder = write_studies(tmp_path / "studies", n_studies=3, n_labelled=2, shape=(48, 48, 6), seed=2)
    studies = sorted(folder.glob("*.nii.gz"))
    labelled = [Study(p.name.split(".")[0], p, folder / "labels" / "final" / p.name) for p in studies[:2]]
    service = ProxyPromptService(
        video_model, weights="random", cache_dir=tmp_path / "cache", segmenter=VideoSegmenter(), support_slices=2
    )
    support = service.study_support(labelled, [1, 2, 3])
    image = read_image(studies[2])
    label, info = service.segment(image, support)
    assert tuple(label.shape) == nib.load(studies[2]).shape and info["propagation"].startswith("SAM 2 memory")
    again, info2 = service.segment(image, support)
    assert torch.equal(label, again) and info2["support_cached"]
    skipped, _ = service.segment(image, support, skip=[0, 5])
    assert not skipped[..., 0].any() and not skipped[..., 5].any()


def test_the_prepared_gpu_check_runs_on_cpu_at_toy_size():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "scripts/check_video_gpu.py", "--device", "cpu", "--image-size", "256", "--preset", "tiny"]
    proc = subprocess.run([*cmd, "--frames", "3"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: 3 frames at 256 px"), proc.stdout + proc.stderr[-2000:]


def test_fig4_video_comparison_writes_every_method(video_model, demo_videos, tmp_path):
    from ppgseg.evaluation.video_protocol import SUPPORT_METHODS, TARGET_METHODS, VideoProtocol

    protocol = VideoProtocol(video_model, demo_videos, draws=2, seed=1)
    res = protocol.run()
    assert set(res["dice"]) == {*SUPPORT_METHODS, *TARGET_METHODS}
    assert all(len(d) == 2 and all(len(obj) == 2 for obj in d) for d in res["dice"].values())
    assert len(set(res["support"].values())) == 2  # two different support frames
    text = protocol.write(tmp_path / "report", note="tiny").read_text()
    assert all(m in text for m in res["dice"]) and (tmp_path / "report" / "fig4_video.png").stat().st_size > 0


def test_a_hidden_object_still_passes_a_gradient_to_the_ppg(video_model, clip):
    """SAM 2.1 replaces the mask of an object scored <= 0 by -1024 with no gradient: forced negative object scores
    must still give an empty mask at threshold 0, and a gradient to the PPG and the memory prompt."""
    frames, _, _ = clip
    head = video_model.sam2.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    assert video_model.sam2.pred_obj_scores
    saved = last.bias.detach().clone()
    try:
        with torch.no_grad():
            last.bias.fill_(-50.0)  # every object "absent"
        video_model.train()
        video_model.zero_grad()
        sup = video_model.video_support(torch.rand(1, 3, 256, 256), boxes_mask((40, 90, 40, 90)))
        out = torch.stack(list(video_model.propagate(frames, sup, 0, 2).values()))
        assert not (out > 0).any() and bool((out > -1024).all())
        (1 - out.sigmoid()).mean().backward()  # ask for the object everywhere
        grads = {n for n, p in video_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert any(n.startswith("generator.") for n in grads) and any(n.startswith("memory_prompt.") for n in grads)
    finally:
        video_model.eval()
        with torch.no_grad():
            last.bias.copy_(saved)
