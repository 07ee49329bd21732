"""SAM 2 video mode with a random SAM 2 (sam2's classes, its tiny config at 256 px): the proxy prompt in memory
attention, propagation both ways, switching target, and what trains."""

from __future__ import annotations

import pytest
import torch

from proxyprompt.build import build_model
from proxyprompt.lora import is_trainable
from proxyprompt.modeling.proxy_sam2_video import ProxyPromptVideo


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
    frames, two, _ = clip
    with torch.no_grad():
        other = video_model.video_support(torch.rand(1, 3, 256, 256), boxes_mask((0, 60, 0, 60), (200, 256, 0, 256)))
        a = video_model.segment_video(frames, {0: two})
        b = video_model.segment_video(frames, {0: other})
    assert not torch.allclose(a[2], b[2])


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
