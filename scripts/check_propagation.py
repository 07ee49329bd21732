"""Propagation check inside volumes: for each labelled volume of a data-contract folder and each of its labels, n
slices of that label (spread over its extent) are drawn and propagated to the rest of the volume, one label at a
time; Dice per label on the slices not drawn, beside nearest-slice copy and shape-based interpolation. Writes
results.json and report.md into --out. Meant for sets whose labels check that propagation covers each object's
extent (e.g. model-made labels), not for accuracy claims.

    .venv/bin/python scripts/check_propagation.py ../shared/realdata/ct_organs_demo
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ppgseg.build import build_model
from ppgseg.data.contract import read_labels, read_split
from ppgseg.evaluation.baselines.volume import interpolate_slices, nearest_copy
from ppgseg.evaluation.volumes import VolumeStudy, dice, drawn_positions
from ppgseg.inference.slices import as_slices
from ppgseg.inference.volume import encode_volume, one_component, propagate

BUNDLE_WEIGHTS = Path(__file__).resolve().parents[1] / "bundle" / "models" / "model.pt"


def extent(label, i: int) -> list[int] | None:
    """First and last slice that show label ``i`` in a (Z, H, W) label map (None: none does)."""
    zs = (label == i).flatten(1).any(1).nonzero()[:, 0]
    return [int(zs[0]), int(zs[-1])] if len(zs) else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: reports/volumes/<folder name>")
    p.add_argument("--ppg-checkpoint", type=Path, default=BUNDLE_WEIGHTS)
    p.add_argument("--axis", type=int, default=2)
    p.add_argument("--drawn", type=int, default=3, help="slices drawn per label")
    p.add_argument("--blend", type=float, default=0.5, help="weight of the neighbour's mask beside the decoder's")
    a = p.parse_args()
    out = a.out or Path("reports/volumes") / a.folder.name
    model = build_model("litemedsam", "cpu", None, a.ppg_checkpoint)
    labels = read_labels(a.folder)
    results: dict = {"drawn": a.drawn, "axis": a.axis, "blend": a.blend, "studies": {}}
    listed = json.loads((a.folder / "dataset.json").read_text())
    items = [i for split in ("training", "test") if listed.get(split) for i in read_split(a.folder, split)]
    for item in items:
        study = VolumeStudy.read(item)
        start = time.perf_counter()
        volume = encode_volume(model, study.image[None], a.axis)
        encode = time.perf_counter() - start
        truth = as_slices(study.label[None], a.axis)[:, 0]
        rows = {}
        for i, name in labels.items():
            if not bool((study.label == i).any()):
                continue
            own = (truth == i).to(torch.uint8)
            zs = drawn_positions(own.movedim(0, a.axis), a.axis, a.drawn)
            drawn = {z: own[z] * i for z in zs}
            keep = torch.ones(len(truth), dtype=torch.bool)
            keep[zs] = False
            start = time.perf_counter()
            slices = as_slices(study.image[None], a.axis)[:, 0]
            pred = one_component(propagate(model, volume, drawn, [i], blend=a.blend, slices=slices), [i])
            seconds = time.perf_counter() - start
            rows[name] = {
                "drawn_slices": zs,
                "extent": extent(truth, i),
                "propagated_extent": extent(pred, i),
                "ppg_propagation": dice(pred[keep], truth[keep], [i])[i],
                "nearest_slice_copy": dice(nearest_copy(drawn, len(truth))[keep], truth[keep], [i])[i],
                "interpolation": dice(interpolate_slices(drawn, len(truth), [i])[keep], truth[keep], [i])[i],
                "seconds": round(seconds, 1),
            }
            print(study.id, name, rows[name], flush=True)
        results["studies"][study.id] = {"labels": rows, "encode_seconds": round(encode, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"# Propagation check: {a.folder.name}",
        "",
        f"{a.drawn} slices drawn per label (spread over its extent along axis {a.axis}), propagated one label at a "
        f"time with the PPG weights `{a.ppg_checkpoint.name}` (blend {a.blend:g}); Dice on the slices not drawn. "
        "Extents are first and last slice. A propagation check, not an accuracy claim.",
        "",
        "| study | label | extent | propagated extent | PPG propagation | nearest copy | interpolation | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sid, r in results["studies"].items():
        for name, row in r["labels"].items():
            lines.append(
                f"| {sid} | {name} | {row['extent']} | {row['propagated_extent']} | {row['ppg_propagation']:.3f} | "
                f"{row['nearest_slice_copy']:.3f} | {row['interpolation']:.3f} | {row['seconds']} |"
            )
    lines += ["", "Written by `scripts/check_propagation.py`.", ""]
    (out / "report.md").write_text("\n".join(lines))
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    from ppgseg.runtime import pad_heap

    pad_heap()
    main()
