"""The paper's studies on any data-contract folder, written as one markdown report with its figures.

- Table 1: train on M training pairs, segment the test split with K supports; Dice per object.
- Table 2: the CSM/CCM ablation (Selective map replaced by the mean context, CCM by pooled context, both).
- Fig. 7: M in {2, 4, 8, 16} training pairs x G in {1, 2, 4, 8} test-time supports (G <= M), several support draws.
- Fig. 4: stability: Dice spread over 5 different support sets for the Table 1 model.

Presets whose image encoder is frozen (the `cpu` preset) encode every training and test image once for the whole
protocol: the encoder's output does not depend on what trains.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice
from tqdm import tqdm

from .build import build_model
from .data.contract import read_labels
from .data.episodes import to_byte_range
from .modeling.proxy_sam import ProxyPromptSAM
from .training import EpisodeBank, make_optimizer, train_episodes
from .workflows import split_samples

ABLATIONS = {
    "PPG (CSM + CCM)": {},
    "without CSM selection (mean context)": {"selector": "mean"},
    "without CCM (pooled context)": {"colorizer": "pooled"},
    "without both": {"selector": "mean", "colorizer": "pooled"},
}


@dataclass
class Settings:
    dataset: Path
    out: Path
    backbone: str = "litemedsam"
    preset: str = "cpu"
    checkpoint: str | None = None
    steps: int = 150
    train_support: int = 4
    test_support: int = 4
    views: int = 2
    draws: int = 5
    train_sizes: tuple[int, ...] = (2, 4, 8, 16)
    support_sizes: tuple[int, ...] = (1, 2, 4, 8)
    studies: tuple[str, ...] = ("table1", "table2", "fig7", "fig4")
    seed: int = 0


class Protocol:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.labels = read_labels(s.dataset)
        self.ids, self.names = list(self.labels), list(self.labels.values())
        self.train_samples = split_samples(s.dataset, "training")
        self.test_samples = split_samples(s.dataset, "test")
        self.bank: EpisodeBank | None = None
        self.test_cache: list | None = None
        self.results: dict = {}

    def model(self, **overrides) -> ProxyPromptSAM:
        torch.manual_seed(self.s.seed)
        return build_model(self.s.backbone, self.s.preset, self.s.checkpoint, **overrides)

    # --- data ------------------------------------------------------------------------------------------------------
    def prepare(self, model: ProxyPromptSAM) -> None:
        """The training bank and the test targets, once for the protocol (with their encoder features where the
        encoder is frozen; otherwise features are computed per model)."""
        if self.bank is not None:
            return
        t = time.time()
        self.bank = EpisodeBank(model, self.train_samples, self.ids, views=self.s.views, seed=self.s.seed)
        self.test_cache = []
        for s in self.test_samples:
            x, geo = model.backbone.preprocess(to_byte_range(s.image)[None])
            labels = s.masks(self.ids)[None]
            self.test_cache.append((x, geo, model.encode_images(x) if self.bank.cached else None, labels))
        print(f"encoded {len(self.train_samples)} training x {self.s.views} views and "
              f"{len(self.test_samples)} test images in {time.time() - t:.0f} s", flush=True)  # fmt: skip

    # --- train / evaluate -----------------------------------------------------------------------------------------
    def train(self, model: ProxyPromptSAM, m: int) -> ProxyPromptSAM:
        self.prepare(model)
        bank = self.bank.subset(list(range(min(m, len(self.bank)))))
        k = min(self.s.train_support, m - 1)
        optimizer = make_optimizer(model)
        train_episodes(model, bank, steps=self.s.steps, num_support=k, optimizer=optimizer, seed=self.s.seed)
        return model

    def support_draw(self, pool: int, g: int, draw: int) -> list[int]:
        """G support pairs among the first ``pool`` training pairs that together show every object."""
        rng = np.random.default_rng([self.s.seed, pool, g, draw])
        shows = self.bank.sampler.shows
        for _ in range(100):
            idx = [int(i) for i in rng.choice(pool, min(g, pool), replace=False)]
            if set(self.ids) <= set().union(*(shows[i] for i in idx)):
                return idx
        return idx

    @torch.no_grad()
    def evaluate(self, model: ProxyPromptSAM, support: list[int]) -> np.ndarray:
        """Mean Dice per object over the test split (targets lacking an object do not count for it)."""
        model.eval()
        b = self.bank
        x, masks = b.x[0, support], b.masks[0, support]
        sup = model.encode_prepared_support(x, masks, b.features(model, 0, support))
        scores = []
        for tx, geo, feats, labels in self.test_cache:
            feats = feats if feats is not None else model.encode_images(tx)
            logits = model.backbone.postprocess(model.segment_features(feats, sup), geo)
            scores.append(compute_dice((logits > 0).float().cpu(), labels, ignore_empty=True)[0].numpy())
        return np.nanmean(np.stack(scores), axis=0)

    # --- studies ---------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        s, res = self.s, self.results
        m_full = len(self.train_samples)
        main = None
        bar = tqdm(total=len(s.studies), desc="studies")
        if {"table1", "fig4"} & set(s.studies):
            t = time.time()
            main = self.train(self.model(), m_full)
            res["train_seconds"] = time.time() - t
        if "table1" in s.studies:
            res["table1"] = self.evaluate(main, self.support_draw(m_full, s.test_support, 0)).tolist()
            bar.update()
        if "table2" in s.studies:
            res["table2"] = {}
            for name, overrides in ABLATIONS.items():
                model = main if not overrides and main is not None else self.train(self.model(**overrides), m_full)
                res["table2"][name] = self.evaluate(model, self.support_draw(m_full, s.test_support, 0)).tolist()
            bar.update()
        if "fig7" in s.studies:
            res["fig7"] = {}
            for m in [m for m in s.train_sizes if m <= m_full]:
                model = main if m == m_full and main is not None else self.train(self.model(), m)
                for g in [g for g in s.support_sizes if g <= m]:
                    dice = [self.evaluate(model, self.support_draw(m, g, d)).mean() for d in range(s.draws)]
                    res["fig7"][f"{m},{g}"] = [float(v) for v in dice]
            bar.update()
        if "fig4" in s.studies:
            draws = [self.evaluate(main, self.support_draw(m_full, s.test_support, d + 1)) for d in range(s.draws)]
            res["fig4"] = [d.tolist() for d in draws]
            bar.update()
        bar.close()
        return res

    # --- report ----------------------------------------------------------------------------------------------------
    def write(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s, res = self.s, self.results
        s.out.mkdir(parents=True, exist_ok=True)
        (s.out / "results.json").write_text(json.dumps(res, indent=2))
        lines = [
            f"# Protocol report: {s.dataset.name}",
            "",
            f"Dataset `{s.dataset}`: {len(self.train_samples)} training and {len(self.test_samples)} test samples, "
            f"objects {', '.join(self.names)}. Backbone `{s.backbone}`, preset `{s.preset}`. Each model trains "
            f"{s.steps} episodes (paper SGD, Dice loss) with up to {s.train_support} supports per episode and "
            f"{s.views} augmentation views, from seed {s.seed}. Dice on the test split; a target that does not show "
            f"an object does not count for it. Written by `scripts/evaluate_protocol.py`.",
            "",
        ]
        header = "| " + " | ".join(["", *self.names, "mean"]) + " |"
        rule = "|" + "---|" * (len(self.names) + 2)

        def row(name, dice):
            return "| " + " | ".join([name, *[f"{v:.3f}" for v in dice], f"{np.nanmean(dice):.3f}"]) + " |"

        if "table1" in res:
            lines += [
                f"## Table 1: Dice with {s.test_support} supports, trained on {len(self.train_samples)} pairs",
                "",
                header,
                rule,
                row("PPG", res["table1"]),
                "",
                f"Training took {res.get('train_seconds', 0):.0f} s.",
                "",
            ]
        if "table2" in res:
            lines += ["## Table 2: CSM / CCM ablation", "", header, rule]
            lines += [row(name, dice) for name, dice in res["table2"].items()] + [""]
        if "fig7" in res:
            cells = {tuple(map(int, k.split(","))): v for k, v in res["fig7"].items()}
            ms, gs = sorted({m for m, _ in cells}), sorted({g for _, g in cells})
            lines += [
                f"## Fig. 7: training pairs M x test supports G (mean Dice over {s.draws} support draws, +- std)",
                "",
                "| M \\ G | " + " | ".join(map(str, gs)) + " |",
                "|" + "---|" * (len(gs) + 1),
            ]
            for m in ms:
                vals = [
                    f"{np.mean(cells[m, g]):.3f} +- {np.std(cells[m, g]):.3f}" if (m, g) in cells else "-" for g in gs
                ]
                lines.append(f"| {m} | " + " | ".join(vals) + " |")
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for m in ms:
                g_m = [g for g in gs if (m, g) in cells]
                ax.errorbar(g_m, [np.mean(cells[m, g]) for g in g_m], [np.std(cells[m, g]) for g in g_m],
                            marker="o", capsize=3, label=f"M = {m}")  # fmt: skip
            ax.set(xscale="log", xticks=gs, xticklabels=gs, xlabel="test-time supports G", ylabel="mean Dice")
            ax.legend()
            fig.tight_layout()
            fig.savefig(s.out / "fig7_support_sizes.png", dpi=120)
            plt.close(fig)
            lines += ["", "![Fig. 7](fig7_support_sizes.png)", ""]
        if "fig4" in res:
            draws = np.array(res["fig4"])  # (draws, objects)
            lines += [
                f"## Fig. 4: stability over {len(draws)} different support sets ({s.test_support} pairs each)",
                "",
                "| | " + " | ".join(self.names) + " | mean |",
                rule,
                "| mean | " + " | ".join(f"{v:.3f}" for v in draws.mean(0)) + f" | {draws.mean():.3f} |",
                "| std | " + " | ".join(f"{v:.3f}" for v in draws.std(0)) + f" | {draws.mean(1).std():.3f} |",
                "| range | " + " | ".join(f"{v:.3f}" for v in np.ptp(draws, 0)) + f" | {np.ptp(draws.mean(1)):.3f} |",
            ]
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.boxplot([draws[:, i] for i in range(draws.shape[1])])
            ax.set_xticks(range(1, len(self.names) + 1), self.names)
            ax.set(ylabel="Dice", title="Dice over support draws")
            fig.tight_layout()
            fig.savefig(s.out / "fig4_stability.png", dpi=120)
            plt.close(fig)
            lines += ["", "![Fig. 4](fig4_stability.png)", ""]
        path = s.out / "report.md"
        path.write_text("\n".join(lines) + "\n")
        return path
