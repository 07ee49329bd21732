"""The real-size video path in one run, for a machine with a GPU (optional, not in CI): SAM 2 at its own 1024 px
(random weights from sam2's config unless --checkpoint), the `paper` preset, a generated clip upsampled to 1024 px,
support memories, propagation both ways, a switch of target mid-clip and one training step. Checks shapes, finite
values and gradients on PPG + memory prompt + LoRA only; prints timings and peak GPU memory.

    python scripts/check_video_gpu.py                 # CUDA, 1024 px, 16 frames
    python scripts/check_video_gpu.py --device cpu --image-size 256 --preset tiny --frames 4   # a quick CPU check
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from ppgseg import build_model
from ppgseg.data.generated.families import ultrasound_video
from ppgseg.lora import is_trainable


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--preset", default="paper")
    p.add_argument("--frames", type=int, default=16, help="at least 3")
    p.add_argument("--checkpoint", default=None, help="a SAM 2.1 checkpoint (random weights without)")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    kwargs = None if a.checkpoint else {"image_size": a.image_size}
    model = build_model(
        "sam2", a.preset, a.checkpoint, pretrained=a.checkpoint is not None, backbone_kwargs=kwargs, video=True
    ).to(device)
    s = model.backbone.img_size
    rng = np.random.default_rng(0)
    clip, labels = ultrasound_video(rng, a.frames)
    sup_img, sup_lab = ultrasound_video(rng, 1)

    def frame_input(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images)[:, None].float().expand(-1, 3, -1, -1)
        return model.backbone.preprocess(F.interpolate(x, size=(s, s), mode="bilinear"))[0]

    masks = torch.stack([torch.from_numpy(sup_lab == i) for i in (1, 2)], 1).float()
    masks = (F.interpolate(masks, size=(s, s), mode="nearest") > 0.5).float().to(device)
    x, sx = frame_input(clip).to(device), frame_input(sup_img).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        t = time.perf_counter()
        frames = model.encode_frames(x)
        both = model.video_support(sx, masks)
        head = model.video_support(sx, masks[:, 1:])
        out = model.segment_video(frames, {1: both, a.frames - 1: head})  # backwards to 0, forwards, switch
        sync()
        seconds = time.perf_counter() - t
    shapes = [tuple(o.shape) for o in out]
    assert all(torch.isfinite(o).all() for o in out), "non-finite logits"
    assert [o.shape[0] for o in out] == [2] * (a.frames - 1) + [1], shapes
    model.train()
    run = model.propagate(frames.select(slice(0, 2)), model.video_support(sx, masks), 0, 2)
    torch.stack(list(run.values())).sigmoid().mean().backward()
    model.eval()
    grads = [n for n, q in model.named_parameters() if q.grad is not None and q.grad.abs().sum() > 0]
    assert grads and all(is_trainable(n) for n in grads), "gradient outside PPG / memory prompt / LoRA"
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"ok: {a.frames} frames at {s} px on {device} ({name})")
    print(f"encode + 2 support sets + propagation both ways with a switch: {seconds:.2f} s "
          f"({a.frames / seconds:.1f} frames/s); low-res masks {shapes[0]} -> {shapes[-1]}")  # fmt: skip
    print(f"one training step reached {len(grads)} trainable tensors; peak GPU memory {memory:.2f} GiB")


if __name__ == "__main__":
    from ppgseg.runtime import pad_heap

    pad_heap()  # freed heap memory kept: CPU forwards stop paying page faults
    main()
