"""PPG + SAM 2 in video mode (paper Sec. 3.3, Fig. 1(b)): a video or a volume segmented from the annotated frames of
*other* subjects, with no prompt on the target at all.

SAM 2's own tracking step (``SAM2Base.track_step``, the call its video predictor makes per frame) runs unchanged:
- the support pairs become SAM 2 conditioning memories: each support frame goes through ``track_step`` with its mask
  as mask input (SAM 2's "mask as output" path and memory encoder), exactly as a clicked first frame would;
- every target frame is a non-conditioning frame whose memory bank holds those support memories, then the model's
  own memories of the frames it predicted (the last ``num_maskmem - 1``), and its object pointers;
- the proxy prompt P of that frame (the PPG on the frame's features and the support) is projected to the memory
  width and appended to the memory (`PromptedMemoryAttention`).
Objects are SAM 2's batch: N objects are tracked as a batch of N, each with its own memories and its row of P.
Propagation runs forwards and backwards from the frame where a support set takes over; a new support set (other
masks, other objects) can take over at any frame, which starts a new memory bank, without retraining.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backbones.sam2 import Sam2Backbone
from .generator import ProxyPromptGenerator, SupportEmbedding
from .memory_prompt import MemoryPrompt, PromptedMemoryAttention
from .prompt_route import PromptRoute
from .proxy_sam import ProxyPromptSAM


@dataclass
class Frames:
    """A clip's SAM 2 features: per level (HW, F, C) features and positional encodings, and the level sizes."""

    feats: list[Tensor]
    pos: list[Tensor]
    sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return self.feats[-1].shape[1]

    def select(self, index: slice | list[int]) -> Frames:
        """The frames at ``index`` (a slice, or a list of positions)."""
        return Frames([x[:, index] for x in self.feats], [x[:, index] for x in self.pos], self.sizes)

    def frame(self, f: int, n: int) -> tuple[list[Tensor], list[Tensor]]:
        """Frame f's features and encodings for a batch of n objects: (HW, n, C) per level."""
        return [x[:, f : f + 1].expand(-1, n, -1) for x in self.feats], [
            x[:, f : f + 1].expand(-1, n, -1) for x in self.pos
        ]


@dataclass
class VideoSupport:
    """A support set for video mode: the PPG's embedding and SAM 2's conditioning outputs (batch N) per pair."""

    embedding: SupportEmbedding
    memories: list[dict]

    @property
    def num_objects(self) -> int:
        return self.embedding.num_objects


class ProxyPromptVideo(ProxyPromptSAM):
    """ProxyPromptSAM on a SAM 2 backbone, with the proxy prompt in memory attention for videos and volumes.

    Args:
        backbone: a `Sam2Backbone`; its memory attention is wrapped (once) by `PromptedMemoryAttention`.
        generator: the PPG.
        memory_prompt: projects P to SAM 2's memory width (trains with the PPG).
        route: how P reaches the decoder when single images are segmented (`ProxyPromptSAM`).
        config: the preset's settings, stored with checkpoints.
    """

    def __init__(
        self,
        *,
        backbone: Sam2Backbone,
        generator: ProxyPromptGenerator,
        memory_prompt: MemoryPrompt,
        route: PromptRoute,
        config: dict | None = None,
    ) -> None:
        if not isinstance(backbone, Sam2Backbone):
            raise TypeError(f"video mode needs the sam2 backbone, got {type(backbone).__name__}")
        super().__init__(backbone=backbone, generator=generator, route=route, config=config)
        self.memory_prompt = memory_prompt
        sam2 = backbone.model
        if not isinstance(sam2.memory_attention, PromptedMemoryAttention):
            sam2.memory_attention = PromptedMemoryAttention(sam2.memory_attention)

    @property
    def sam2(self) -> torch.nn.Module:
        return self.backbone.model

    # --- features ------------------------------------------------------------------------------------------------
    def encode_frames(self, x: Tensor) -> Frames:
        """(F, 3, S, S) preprocessed frames -> their SAM 2 features, one frame at a time (no autograd unless the
        encoder has LoRA)."""
        parts = []
        for f in range(x.shape[0]):
            with torch.set_grad_enabled(self.encoder_trains and torch.is_grad_enabled()):
                parts.append(self.backbone.frame_features(x[f : f + 1]))
        feats = [torch.cat(level, dim=1) for level in zip(*(p[0] for p in parts), strict=True)]
        pos = [torch.cat(level, dim=1) for level in zip(*(p[1] for p in parts), strict=True)]
        return Frames(feats, pos, parts[0][2])

    def frame_prompt(self, frames: Frames, f: int, support: VideoSupport) -> tuple[Tensor, Tensor]:
        """P of frame f, as memory tokens and positions: (T, N, M) each."""
        one = [x[:, f : f + 1] for x in frames.feats]
        features = self.backbone.image_features(one, frames.sizes)
        tokens, _ = self.generator(self.to_grid(features.embed), support.embedding)  # (1, N, T, C)
        tokens = tokens + self.backbone.token_pe(round(tokens.shape[2] ** 0.5))
        return self.memory_prompt(tokens[0])  # (N, T, C) -> (T, N, M)

    # --- support ---------------------------------------------------------------------------------------------------
    def video_support(self, x: Tensor, masks: Tensor, frames: Frames | None = None) -> VideoSupport:
        """Preprocessed support pairs (K, 3, S, S) and masks (K, N, S, S) -> the PPG embedding and, per pair, SAM 2's
        conditioning output for the N objects (its memory features, their encodings and object pointers).
        ``frames``: the pairs' features if already computed (`encode_frames`)."""
        frames = frames if frames is not None else self.encode_frames(x)
        features = self.backbone.image_features(frames.feats, frames.sizes)  # what the PPG reads in image mode too
        embedding = self.encode_prepared_support(x, masks, features)
        n = masks.shape[1]
        memories = []
        for k in range(x.shape[0]):
            feats, pos = frames.frame(k, n)
            out = self.sam2.track_step(
                frame_idx=0, is_init_cond_frame=True, current_vision_feats=feats, current_vision_pos_embeds=pos,
                feat_sizes=frames.sizes, point_inputs=None, mask_inputs=masks[k][:, None].float(),
                output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}, num_frames=1,
            )  # fmt: skip
            memories.append(out)
        return VideoSupport(embedding, memories)

    # --- propagation -----------------------------------------------------------------------------------------------
    def propagate(
        self, frames: Frames, support: VideoSupport, start: int, stop: int, *, reverse: bool = False
    ) -> dict[int, Tensor]:
        """Segment frames start, start+1, ..., stop-1 (or start, start-1, ..., stop+1 with ``reverse``) from the
        support memories, the memories of the frames already predicted in this pass, and each frame's P.

        Returns:
            frame index -> (N, h, w) low-res mask logits (SAM 2's 4x feature grid, the padded input frame).
        """
        attention: PromptedMemoryAttention = self.sam2.memory_attention

        def step(f: int, bank: dict) -> dict:
            with attention.prompting(self.frame_prompt(frames, f, support)):
                return self.track(frames, f, support.num_objects, bank, reverse=reverse)

        return self.run_pass(support, start, stop, step, reverse=reverse)

    def memory_bank(self, support: VideoSupport, start: int, reverse: bool) -> dict:
        """SAM 2's ``output_dict`` for a pass from ``start``: the support memories as conditioning frames, placed
        just before the first frame of the pass (after it, backwards), so that SAM 2's "object pointers from the past
        only" rule keeps them and their temporal distance grows along the pass."""
        step = -1 if reverse else 1
        anchor = start - step
        cond = {anchor - step * k: m for k, m in enumerate(support.memories)}
        return {"cond_frame_outputs": cond, "non_cond_frame_outputs": {}}

    def track(
        self, frames: Frames, f: int, n: int, bank: dict, *, reverse: bool = False, point_inputs: dict | None = None,
        run_mem_encoder: bool = True,
    ) -> dict:  # fmt: skip
        """SAM 2's own ``track_step`` on frame f for n objects, against the memories in ``bank``."""
        feats, pos = frames.frame(f, n)
        return self.sam2.track_step(
            frame_idx=f, is_init_cond_frame=False, current_vision_feats=feats, current_vision_pos_embeds=pos,
            feat_sizes=frames.sizes, point_inputs=point_inputs, mask_inputs=None, output_dict=bank,
            num_frames=len(frames) + len(bank["cond_frame_outputs"]) + 1, track_in_reverse=reverse,
            run_mem_encoder=run_mem_encoder,
        )  # fmt: skip

    def run_pass(
        self, support: VideoSupport, start: int, stop: int, step: Callable[[int, dict], dict], *, reverse: bool
    ) -> dict[int, Tensor]:
        """One propagation pass: ``step(f, bank)`` returns SAM 2's output for frame f, which joins the bank as a
        non-conditioning memory. Returns frame index -> (N, h, w) low-res logits."""
        bank = self.memory_bank(support, start, reverse)
        out = {}
        for f in range(start, stop, -1 if reverse else 1):
            current = step(f, bank)
            bank["non_cond_frame_outputs"][f] = current
            out[f] = through_object_score(current)
        return out

    def segment_video(self, frames: Frames, supports: Mapping[int, VideoSupport]) -> list[Tensor]:
        """Every frame of a clip: support set ``supports[s]`` takes over at frame s (a new memory bank each time) and
        propagates forwards to the next switch; the first one also propagates backwards to frame 0.

        Returns:
            per frame, (N_f, h, w) low-res logits (N_f: the objects of the support set in charge of that frame).
        """
        if not supports:
            raise ValueError("segment_video needs at least one support set")
        starts = sorted(supports)
        if starts[0] < 0 or starts[-1] >= len(frames):
            raise ValueError(f"support frames {starts} must lie in the clip's 0..{len(frames) - 1}")
        out: dict[int, Tensor] = {}
        for i, s in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(frames)
            out.update(self.propagate(frames, supports[s], s, end))
        if starts[0] > 0:
            out.update(self.propagate(frames, supports[starts[0]], starts[0] - 1, -1, reverse=True))
        return [out[f] for f in range(len(frames))]


def through_object_score(current: dict) -> Tensor:
    """SAM 2's low-res mask logits of one frame, (N, h, w), with a gradient where the object score hides the mask.

    With ``pred_obj_scores`` (every SAM 2.1 config), SAM 2 replaces the masks of objects whose score is <= 0 by
    -1024 through a ``torch.where`` that passes no gradient: a model that starts there (or falls there) would get an
    exactly-empty mask and a zero gradient forever. Here such an object's pixels take its object-score logit
    instead: the same empty mask at threshold 0, and the loss reaches the score (through the decoder's LoRA and P in
    memory attention), as SAM 2's own training supervises it.
    """
    masks = current["pred_masks"][:, 0]  # (N, 1, h, w) -> (N, h, w)
    score = current.get("object_score_logits")  # (N, 1); SAM 2 keeps it outside training mode (its backbone here)
    if score is None:
        return masks
    score = score[:, :, None].to(masks.dtype)  # (N, 1, 1)
    return torch.where(score > 0, masks, score.expand_as(masks))
