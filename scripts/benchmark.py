"""Latency and memory of the PPG against the backbone with a box prompt, measured in one run on this machine."""

from __future__ import annotations

import argparse
import resource
import time

import torch

from ppgseg import build_model
from ppgseg.data.generated.shapes import two_object_set
from ppgseg.data.tiles import starts
from ppgseg.inference.tiles import segment_tiled


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="litemedsam")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--ns", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tile-size", type=int, default=565, help="side of the large image for the tiles row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    images, masks = two_object_set(max(args.ks) + 1, 256, seed=0)
    target = images[-1:]
    box = torch.tensor([[0.0, 0.0, 255.0, 255.0]])
    print(f"device {args.device}, threads {torch.get_num_threads()}, backbone {args.backbone}, 256x256 images")
    for preset in args.presets:
        model = build_model(args.backbone, preset, checkpoint=args.checkpoint).to(args.device)
        with torch.no_grad():
            t_box = timed(lambda m=model: m.backbone.predict_box(target, box), args.repeat)
            t_enc = timed(lambda m=model: m.encode_images(m.backbone.preprocess(target)[0]), args.repeat)
            print(f"\n[{preset}] backbone with box: {t_box * 1000:.0f} ms/target (encoder alone {t_enc * 1000:.0f} ms)")
            print("  K  N  support encoding   x encoder   PPG per target   x box")
            for k in args.ks:
                for n in args.ns:
                    sup_images, sup_masks = images[:k], masks[:k, :n]
                    t_sup = timed(lambda m=model, i=sup_images, s=sup_masks: m.encode_support(i, s), 1)
                    support = model.encode_support(sup_images, sup_masks)
                    t_seg = timed(lambda m=model, s=support: m.segment(target, s), args.repeat)
                    print(
                        f"{k:3d} {n:2d} {t_sup * 1000:12.0f} ms {t_sup / t_enc:9.1f}x {t_seg * 1000:12.0f} ms "
                        f"{t_seg / t_box:8.2f}x",
                        flush=True,
                    )
            big = torch.nn.functional.interpolate(images[:1].float(), size=(args.tile_size,) * 2, mode="bilinear")
            big = big.round().to(torch.uint8)
            tile = model.backbone.img_size
            support = model.encode_support(images[:4], masks[:4, :1])
            t_one = timed(lambda m=model, s=support, b=big: m.segment(b, s), args.repeat)
            t_tiles = timed(lambda m=model, s=support, b=big, t=tile: segment_tiled(m, b, s, tile=t), args.repeat)
            windows = len(starts(args.tile_size, tile, 0.25)) ** 2
            print(
                f"  {args.tile_size}x{args.tile_size} target, one pass {t_one * 1000:.0f} ms; {windows} native tiles "
                f"of {tile} (overlap 0.25) {t_tiles * 1000:.0f} ms: {t_tiles / t_one:.1f}x",
                flush=True,
            )
        peak = (
            torch.cuda.max_memory_allocated() / 2**20
            if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        print(f"  peak memory so far: {peak:.0f} MiB ({'GPU allocated' if args.device.startswith('cuda') else 'RSS'})")


if __name__ == "__main__":
    from ppgseg.runtime import pad_heap

    pad_heap()  # freed heap memory kept: CPU forwards stop paying page faults
    main()
