"""The paper's studies on any data-contract folder, written as one markdown report with its figures.

- Table 1: train on M training pairs, segment the test split with K supports; Dice per object, for PPG and each of
  its peers in `baselines` (same backbone, preprocessing, data, supports and metric), with their per-target latency.
- Table 2: the CSM/CCM ablation (Selective map replaced by the mean context, CCM by pooled context, both).
- Prompt routes: P alone (Eq. 12), the carried support masks alone, both, and the carried masks with no decoder,
  each trained as it runs (`modeling/prompt_route.py`).
- Fig. 7: M in {2, 4, 8, 16} training pairs x G in {1, 2, 4, 8} test-time supports (G <= M), several support draws.
- Fig. 4: stability: Dice spread over 5 different support sets, for every method of Table 1.
- Objects: Dice of the objects asked for against how many are asked at once (N = 1 ... all labels), on random
  subsets of the labels; each object is scored only where it is asked for.

Presets whose image encoder is frozen (the `cpu` preset) encode every training and test image once for the whole
protocol: the encoder's output does not depend on what trains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import compute_dice
from tqdm import tqdm

from ..build import build_model
from ..data.contract import read_labels
from ..data.intensity import to_byte_range
from ..data.splits import split_samples
from ..modeling.prompt_route import ROUTES
from ..modeling.proxy_sam import ProxyPromptSAM
from ..training import OPTIMIZERS, EpisodeBank, make_optimizer, train_episodes
from .baselines import METHODS, PPG_METHODS
from .comparison import MethodComparison
from .report import ProtocolResult

# the paper's Dice loss (Eq. 13), or Dice + BCE: with Dice alone a route whose first masks are all background can
# settle on empty masks, where the saturated sigmoid passes no gradient; BCE's gradient does not vanish there
LOSSES = {"dice": DiceLoss, "dicece": DiceCELoss}

ROUTE_ABLATIONS = {
    "P only (paper, Eq. 12)": "paper",
    "mask transfer only (P unused)": "mask",
    "both (P + carried mask)": "transfer",
    "carried mask thresholded, no decoder": "coarse",
}

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
    prompt: str = "transfer"
    ppg_checkpoint: str | None = None
    train_pairs: int | None = None
    test_images: int | None = None
    loss: str = "dice"
    optimizer: str = "sgd"
    lr: float | None = None
    steps: int = 150
    train_support: int = 4
    test_support: int = 4
    views: int = 2
    draws: int = 5
    train_sizes: tuple[int, ...] = (2, 4, 8, 16)
    support_sizes: tuple[int, ...] = (1, 2, 4, 8)
    studies: tuple[str, ...] = ("table1", "table2", "routes", "fig7", "fig4")
    methods: tuple[str, ...] = METHODS
    finetune_steps: int = 150
    overlays: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods must be among {list(METHODS)}, got {list(self.methods)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


class Protocol:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.labels = read_labels(s.dataset)
        self.ids, self.names = list(self.labels), list(self.labels.values())
        self.train_samples = split_samples(s.dataset, "training")[: s.train_pairs]
        self.test_samples = split_samples(s.dataset, "test")[: s.test_images]
        self.bank: EpisodeBank | None = None
        self.test_cache: list | None = None
        self.results: dict = {}
        self.overlays: dict[str, list] = {}  # method -> binary masks (N, H0, W0) of the first targets
        self.targets: list = []  # the test targets of the method comparison

    def model(self, **overrides) -> ProxyPromptSAM:
        torch.manual_seed(self.s.seed)
        return build_model(
            self.s.backbone, self.s.preset, self.s.checkpoint, self.s.ppg_checkpoint,
            **{"prompt": self.s.prompt, **overrides},
        )  # fmt: skip

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
        self.results["encoder_seconds"] = self.encoder_seconds(model)
        print(f"encoded {len(self.train_samples)} training x {self.s.views} views and "
              f"{len(self.test_samples)} test images in {time.time() - t:.0f} s", flush=True)  # fmt: skip

    @torch.no_grad()
    def encoder_seconds(self, model: ProxyPromptSAM) -> float:
        """The frozen image encoder's time per target (every method runs it once per target)."""
        t = time.perf_counter()
        for x, *_ in self.test_cache[:4]:
            model.backbone.encode(x)
        return (time.perf_counter() - t) / min(4, len(self.test_cache))

    # --- train / evaluate -----------------------------------------------------------------------------------------
    def train(self, model: ProxyPromptSAM, m: int) -> ProxyPromptSAM:
        self.prepare(model)
        if self.s.steps == 0:  # the start weights as they are (zero-training evaluation)
            return model
        bank = self.bank.subset(list(range(min(m, len(self.bank)))))
        k = min(self.s.train_support, m - 1)
        optimizer = make_optimizer(model, lr=self.s.lr, kind=self.s.optimizer)
        train_episodes(
            model, bank, steps=self.s.steps, num_support=k, optimizer=optimizer, seed=self.s.seed,
            progress=f"PPG on {m} pairs", loss_fn=LOSSES[self.s.loss](sigmoid=True),
        )  # fmt: skip
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
    def evaluate(self, model: ProxyPromptSAM, support: list[int], objects: list[int] | None = None) -> np.ndarray:
        """Mean Dice per object over the test split (targets lacking an object do not count for it); ``objects``:
        the indices of the labels asked for (default: all of them, in order)."""
        model.eval()
        b = self.bank
        asked = list(range(len(self.ids))) if objects is None else list(objects)
        x, masks = b.x[0, support], b.masks[0, support][:, asked]
        sup = model.encode_prepared_support(x, masks, b.features(model, 0, support))
        scores = []
        for tx, geo, feats, labels in self.test_cache:
            feats = feats if feats is not None else model.encode_images(tx)
            logits = model.backbone.postprocess(model.segment_features(feats, sup), geo)
            truth = labels[:, asked]
            scores.append(compute_dice((logits > 0).float().cpu(), truth, ignore_empty=True)[0].numpy())
        return np.nanmean(np.stack(scores), axis=0)

    def objects_study(self, model: ProxyPromptSAM) -> dict[str, list[float]]:
        """N -> mean Dice of the asked objects, one value per draw (a random subset of N labels and a support set
        that shows them), N = 1 ... all labels."""
        s, out = self.s, {}
        m_full = len(self.train_samples)
        for n in range(1, len(self.ids) + 1):
            values = []
            for d in range(s.draws):
                rng = np.random.default_rng([s.seed, n, d, 7])
                asked = sorted(int(i) for i in rng.choice(len(self.ids), n, replace=False))
                values.append(
                    float(np.nanmean(self.evaluate(model, self.support_draw(m_full, s.test_support, d), asked)))
                )
            out[str(n)] = values
        return out

    # --- studies ---------------------------------------------------------------------------------------------------
    def run(self) -> ProtocolResult:
        """Every study of ``Settings.studies``; `report.write_report` writes the result."""
        s, res = self.s, self.results
        m_full = len(self.train_samples)
        main = None
        bar = tqdm(total=len(s.studies), desc="studies")
        comparison = {"table1", "fig4"} & set(s.studies)
        uses_ppg = bool(set(PPG_METHODS) & set(s.methods))
        if comparison and uses_ppg or {"table2", "routes", "fig7", "objects"} & set(s.studies):
            main = self.model()
            self.prepare(main)
            t = time.time()
            main = self.train(main, m_full)
            res["train_seconds"] = time.time() - t  # the episodes only, like the fine-tune's time
        if comparison:
            compared = MethodComparison(self)
            compared.compare(main if uses_ppg else None)
            self.targets = compared.targets
            bar.update(len(comparison))
        if "table2" in s.studies:
            res["table2"] = {}
            for name, overrides in ABLATIONS.items():
                model = main if not overrides and main is not None else self.train(self.model(**overrides), m_full)
                res["table2"][name] = self.evaluate(model, self.support_draw(m_full, s.test_support, 0)).tolist()
            bar.update()
        if "routes" in s.studies:
            res["routes"] = {}
            for name, route in ROUTE_ABLATIONS.items():
                if route == s.prompt and main is not None:
                    model = main
                elif ROUTES[route].uses_decoder:
                    model = self.train(self.model(prompt=route), m_full)
                else:  # nothing to train
                    model = self.model(prompt=route)
                    self.prepare(model)
                res["routes"][name] = self.evaluate(model, self.support_draw(m_full, s.test_support, 0)).tolist()
            bar.update()
        if "fig7" in s.studies:
            res["fig7"] = {}
            for m in [m for m in s.train_sizes if m <= m_full]:
                model = main if m == m_full and main is not None else self.train(self.model(), m)
                for g in [g for g in s.support_sizes if g <= m]:
                    dice = [self.evaluate(model, self.support_draw(m, g, d)).mean() for d in range(s.draws)]
                    res["fig7"][f"{m},{g}"] = [float(v) for v in dice]
            bar.update()
        if "objects" in s.studies:
            res["objects"] = self.objects_study(main)
            bar.update()
        bar.close()
        return ProtocolResult(s, self.names, m_full, len(self.test_samples), res, self.overlays, self.targets)
