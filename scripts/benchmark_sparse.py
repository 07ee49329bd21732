"""Sparse slice decoding against decoding every slice, in one process: decodes, seconds and Dice per setting.

The app's path for a study whose encoding is cached (`ProxyPromptService.segment`, `sparse_slice_logits`),
without HTTP: the generated CT-like studies of `benchmark_app.py` (same seed), the embedded default (LiteMedSAM,
`cpu` preset, bundle default weights) fine-tuned on the fly as the app does, the support set of the first three
studies; then each later study is encoded once and segmented with every slice decoded and with each
``stride:agree`` setting asked for. Dice is against the studies' generated labels ("truth") and against the
every-slice answer ("to every slice").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from ppgseg import build_model
from ppgseg.checkpoint import load_ppg
from ppgseg.data.generated.families import write_studies
from ppgseg.inference import DecodePolicy
from ppgseg.io import read_image
from ppgseg.serving import FineTuneSettings, ImageSegmenter, ProxyPromptService, Study

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"liver": 1, "spleen": 2, "kidney": 3}  # the generated studies' dataset.json


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def setting(text: str) -> tuple[int, float]:
    stride, agree = text.split(":")
    return int(stride), float(agree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--finetune-seconds", type=float, default=60.0)
    parser.add_argument("--targets", type=int, default=2, help="studies segmented (after the 3 support studies)")
    parser.add_argument("--settings", nargs="+", type=setting, default=[(4, 0.8), (4, 0.7), (4, 0.6)],
                        help="stride:agree pairs (`sparse_slice_logits`)")  # fmt: skip
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ppgseg_sparse_"))
    studies = write_studies(
        work / "studies", n_studies=3 + args.targets, n_labelled=3 + args.targets,
        shape=(args.size, args.size, args.slices), seed=5,
    )  # fmt: skip
    model = build_model("litemedsam", "cpu")
    load_ppg(model, ROOT / "bundle" / "models" / "model.pt")
    service = ProxyPromptService(
        model, weights="bundle default", cache_dir=work / "cache", finetune=FineTuneSettings(args.finetune_seconds)
    )
    label = {i: studies / "labels" / "final" / f"ct_{i:03d}.nii.gz" for i in range(3 + args.targets)}
    support = service.study_support(
        [Study(f"ct_{i:03d}", studies / f"ct_{i:03d}.nii.gz", label[i]) for i in range(3)], list(LABELS.values())
    )
    decoded = []
    decode_kept = model.decode_kept

    def counted(features, tokens, coarse, keep):
        decoded.append(int(keep.sum()))
        return decode_kept(features, tokens, coarse, keep)

    model.decode_kept = counted
    print(f"{args.slices} slices of {args.size}x{args.size}; support {support.sources}")
    for i in range(3, 3 + args.targets):
        study = Study(f"ct_{i:03d}", studies / f"ct_{i:03d}.nii.gz")
        image = read_image(study.image)
        truth = np.asarray(nib.load(label[i]).dataobj)
        service.segment(image, support, study=study)  # encodes the study (and fine-tunes, the first time)
        every = None
        for stride, agree in [(1, DecodePolicy.agree), *args.settings]:
            policy = DecodePolicy(min_carried=service.segmenter.policy.min_carried, z_stride=stride, agree=agree)
            service.segmenter = ImageSegmenter(policy)
            decoded.clear()
            start = time.perf_counter()
            out, info = service.segment(image, support, study=study)
            seconds = time.perf_counter() - start
            out = out.numpy()
            every = out if every is None else every
            to_truth = [dice(out == v, truth == v) for v in LABELS.values()]
            to_every = [dice(out == v, every == v) for v in LABELS.values()]
            name = "every slice" if stride == 1 else f"stride {stride}, agree {agree}"
            print(
                f"{study.id}, {name}: {sum(decoded)} decodes, {seconds:.1f} s; Dice truth "
                f"{', '.join(f'{d:.3f}' for d in to_truth)}; to every slice {', '.join(f'{d:.3f}' for d in to_every)}",
                flush=True,
            )
    print(f"weights: {info['weights']}")


if __name__ == "__main__":
    from ppgseg.runtime import pad_heap

    pad_heap()  # freed heap memory kept: CPU forwards stop paying page faults
    main()
