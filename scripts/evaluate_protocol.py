"""The paper's studies on a data-contract folder: Table 1 (PPG and its peers, --methods), Table 2 (CSM/CCM ablation),
Fig. 7 (support sizes), Fig. 4 (stability over support draws, every method); writes report.md, results.json and the
figures into --out."""

from __future__ import annotations

import argparse
from pathlib import Path

from ppgseg.evaluation.baselines import METHODS
from ppgseg.evaluation.protocol import Protocol, Settings
from ppgseg.evaluation.report import write_report
from ppgseg.modeling.prompt_route import ROUTES
from ppgseg.training import OPTIMIZERS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", type=Path, default=Path("data/demo/fundus"), help="a data-contract folder")
    p.add_argument("--out", type=Path, default=Path("reports/fundus"))
    p.add_argument("--backbone", default="litemedsam")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--checkpoint", default=None, help="backbone weights (SAM / SAM 2)")
    p.add_argument("--prompt", default="transfer", choices=sorted(ROUTES), help="PPG's prompt route (Table 1)")
    p.add_argument(
        "--ppg-checkpoint",
        default=None,
        help="PPG start weights (e.g. bundle/models/model.pt; with "
        "--steps 0: evaluated as they are); default: from scratch",
    )
    p.add_argument("--train-pairs", type=int, default=None, help="use the first N pairs of the training split")
    p.add_argument("--test-images", type=int, default=None, help="use the first N images of the test split")
    p.add_argument("--loss", default="dice", choices=["dice", "dicece"], help="PPG training loss (paper: dice)")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS, help="PPG optimiser (paper: sgd)")
    p.add_argument("--lr", type=float, default=None, help="its learning rate (default: SGD 0.01, AdamW 1e-3)")
    p.add_argument("--steps", type=int, default=150, help="training episodes per model")
    p.add_argument("--train-support", type=int, default=4, help="supports per training episode (paper: M - 1)")
    p.add_argument("--test-support", type=int, default=4)
    p.add_argument("--views", type=int, default=2, help="augmentation views of the training set")
    p.add_argument("--draws", type=int, default=5, help="support draws for Fig. 7 and Fig. 4")
    p.add_argument("--train-sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--support-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument(
        "--studies",
        nargs="+",
        default=["table1", "table2", "routes", "fig7", "fig4"],
        help="also: objects (Dice against the number of objects asked at once)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="Table 1 / Fig. 4 rows")
    p.add_argument("--finetune-steps", type=int, default=150, help="steps per object of the decoder fine-tune")
    p.add_argument("--overlays", type=int, default=4, help="test targets shown side by side for every method")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    settings = Settings(
        dataset=a.dataset, out=a.out, backbone=a.backbone, preset=a.preset, checkpoint=a.checkpoint, prompt=a.prompt,
        ppg_checkpoint=a.ppg_checkpoint, train_pairs=a.train_pairs,
        test_images=a.test_images, loss=a.loss, optimizer=a.optimizer, lr=a.lr, steps=a.steps,
        train_support=a.train_support, test_support=a.test_support, views=a.views, draws=a.draws,
        train_sizes=tuple(a.train_sizes), support_sizes=tuple(a.support_sizes), studies=tuple(a.studies),
        methods=tuple(a.methods), finetune_steps=a.finetune_steps, overlays=a.overlays, seed=a.seed,
    )  # fmt: skip
    print(f"wrote {write_report(Protocol(settings).run())}")


if __name__ == "__main__":
    from ppgseg.runtime import pad_heap

    pad_heap()  # freed heap memory kept: CPU forwards stop paying page faults
    main()
