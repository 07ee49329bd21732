"""SAM 2 video baselines in the harness of PPG's video mode (paper Fig. 4): the same SAM 2, frames, support memories
and propagation passes (`ProxyPromptVideo.run_pass`), without the proxy prompt.

- MedSAM2-style: the support frame's mask as a first-frame mask prompt (SAM 2's conditioning memory), then SAM 2's
  plain propagation.
- SAM2-SGP-style: on each frame, a pseudo-mask from the support memories (SAM 2 without any prompt, not written to
  memory), whose box becomes that frame's box prompt; the boxed prediction is what joins the memory. An object whose
  pseudo-mask is empty gets the whole frame as its box.
- SAM 2 with a box on the target's own first frame: the usual interactive flow, for the speed comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...backbones.base import mask_box
from ...modeling.proxy_sam2_video import Frames, ProxyPromptVideo, VideoSupport


def box_points(boxes: Tensor) -> dict:
    """(N, 4) xyxy boxes in input pixels -> SAM 2's point inputs (corners labelled 2 and 3)."""
    coords = boxes.reshape(-1, 2, 2)
    labels = torch.tensor([[2, 3]], dtype=torch.int32, device=boxes.device).expand(len(boxes), 2)
    return {"point_coords": coords, "point_labels": labels}


def mask_prompt_pass(
    model: ProxyPromptVideo, frames: Frames, support: VideoSupport, start: int, stop: int, *, reverse: bool = False
) -> dict[int, Tensor]:
    """MedSAM2-style propagation: frame index -> (N, h, w) low-res logits."""

    def step(f: int, bank: dict) -> dict:
        return model.track(frames, f, support.num_objects, bank, reverse=reverse)

    return model.run_pass(support, start, stop, step, reverse=reverse)


def pseudo_box_pass(
    model: ProxyPromptVideo, frames: Frames, support: VideoSupport, start: int, stop: int, *, reverse: bool = False
) -> dict[int, Tensor]:
    """SAM2-SGP-style propagation: frame index -> (N, h, w) low-res logits."""
    n, size = support.num_objects, model.backbone.img_size

    def step(f: int, bank: dict) -> dict:
        pseudo = model.track(frames, f, n, bank, reverse=reverse, run_mem_encoder=False)["pred_masks"][:, 0]
        boxes = torch.tensor([[0.0, 0.0, size, size]]).repeat(n, 1)
        for i, m in enumerate(pseudo.cpu() > 0):
            box = mask_box(m.float())
            if box is not None:
                boxes[i] = box * (size / m.shape[-1])
        return model.track(frames, f, n, bank, reverse=reverse, point_inputs=box_points(boxes.to(pseudo.device)))

    return model.run_pass(support, start, stop, step, reverse=reverse)


def first_frame_box_pass(model: ProxyPromptVideo, frames: Frames, boxes: Tensor) -> dict[int, Tensor]:
    """SAM 2 prompted with (N, 4) boxes on the target's frame 0 (input pixels), propagated to the last frame."""
    return first_frame_pass(model, frames, len(boxes), point_inputs=box_points(boxes))


def first_frame_pass(
    model: ProxyPromptVideo,
    frames: Frames,
    n: int,
    *,
    point_inputs: dict | None = None,
    mask_inputs: Tensor | None = None,
) -> dict[int, Tensor]:
    """SAM 2's interactive flow for n objects: a prompt on the target's frame 0 (points / box corners in input
    pixels, or (n, 1, S, S) masks), then propagation to the last frame."""
    bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    feats, pos = frames.frame(0, n)
    first = model.sam2.track_step(
        frame_idx=0, is_init_cond_frame=True, current_vision_feats=feats, current_vision_pos_embeds=pos,
        feat_sizes=frames.sizes, point_inputs=point_inputs, mask_inputs=mask_inputs, output_dict=bank,
        num_frames=len(frames),
    )  # fmt: skip
    bank["cond_frame_outputs"][0] = first
    out = {0: first["pred_masks"][:, 0]}
    for f in range(1, len(frames)):
        current = model.track(frames, f, n, bank)
        bank["non_cond_frame_outputs"][f] = current
        out[f] = current["pred_masks"][:, 0]
    return out
