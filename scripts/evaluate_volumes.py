"""The volume protocol on a data-contract folder of labelled volumes: K labelled studies -> a new study, and n drawn
slices -> the rest of the study, PPG routes beside multi-atlas registration, a MONAI 3D UNet, LiteMedSAM with the
ground-truth box, nearest-slice copy and shape-based interpolation. Writes results.json (after every study: a
stopped run resumes), report.md, dice_vs_k.png and overlays.png into --out.

    .venv/bin/python scripts/evaluate_volumes.py ../shared/realdata/hippocampus_mri --limit 10
"""

from __future__ import annotations

import logging
from pathlib import Path

from ppgseg.build import build_model
from ppgseg.evaluation.volume_report import write_volume_report
from ppgseg.evaluation.volumes import BUNDLE_WEIGHTS, VolumeProtocol, volume_parser
from ppgseg.inference.atlas import FUSIONS, AtlasRegistration
from ppgseg.training.registered import RegistrationFineTune


def main() -> None:
    p = volume_parser(
        __doc__, "data-contract folder with training and test volumes", "PPG weights (default: the bundle's)"
    )
    p.add_argument("--out", type=Path, default=None, help="default: reports/volumes/<folder name>")
    p.add_argument(
        "--ks", type=int, nargs="*", default=[1, 2, 5, 10], help="numbers of labelled studies (none: no such mode)"
    )
    p.add_argument(
        "--drawn", type=int, nargs="*", default=[1, 2, 3], help="numbers of drawn slices (none: no drawn mode)"
    )
    p.add_argument("--limit", type=int, default=None, help="the first N test studies (default: all)")
    p.add_argument("--unet-seconds", type=float, default=120.0, help="3D UNet training budget per K (0: no UNet)")
    p.add_argument(
        "--tune-episodes",
        type=int,
        default=400,
        help="episodes of the registration route's on-the-fly fine-tune on the K studies (0: no such row)",
    )
    p.add_argument(
        "--fusion",
        choices=FUSIONS,
        default="local",
        help="how the registered atlases' labels are fused (local: locally weighted voting; the majority vote is "
        "then scored beside it)",
    )
    p.add_argument(
        "--trained-on", default=None, help="what --ppg-checkpoint was trained on from this set, for the report"
    )
    p.add_argument("--report-only", action="store_true", help="rewrite the report from --out's results.json")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = a.out or Path("reports/volumes") / a.folder.name
    model = build_model(a.backbone, "cpu", a.checkpoint, a.ppg_checkpoint)
    protocol = VolumeProtocol(
        model, a.folder, out, axis=a.axis, ks=a.ks, drawn=a.drawn, limit=a.limit, unet_seconds=a.unet_seconds,
        cache_dir=a.cache / a.backbone, seed=a.seed, registration=AtlasRegistration(fusion=a.fusion),
        tune=RegistrationFineTune(episodes=a.tune_episodes) if a.tune_episodes > 0 else None,
    )  # fmt: skip
    results = protocol.load() if a.report_only else protocol.run()
    weights = a.ppg_checkpoint.name if a.ppg_checkpoint == BUNDLE_WEIGHTS else str(a.ppg_checkpoint)
    trained = (
        f"trained offline on {a.trained_on}; the test studies are never trained on"
        if a.trained_on
        else "the only training on this set is the registration route's on-the-fly fine-tune on the K labelled "
        f"studies, {a.tune_episodes} episodes"
        if a.tune_episodes
        else "no training on this set"
    )
    unet = (
        f"3D UNet budget {a.unet_seconds:g} s per K on this machine's CPU."
        if a.unet_seconds
        else "No 3D UNet row (--unet-seconds 0)."
    )
    note = (
        f"Backbone {a.backbone}, PPG weights {weights} ({trained}; otherwise the labelled studies are only "
        f"supports and atlases). {unet}"
    )
    print(f"wrote {write_volume_report(results, out, note=note)}")


if __name__ == "__main__":
    from ppgseg.runtime import pad_heap

    pad_heap()
    main()
