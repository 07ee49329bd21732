"""Table 1 and Fig. 4 of the protocol: PPG and its peers on the same backbone, preprocessing, supports, targets and
metric, with their latency."""

from __future__ import annotations

import time

import numpy as np
import torch
from monai.metrics import compute_dice
from tqdm import tqdm

from ..backbones.base import Backbone
from ..build import build_backbone
from ..modeling.proxy_sam import ProxyPromptSAM
from .baselines import BASELINES, PPG_METHODS, Method, Pairs, ProxyPrompt, Target
from .baselines.base import encode_each


class MethodComparison:
    """Fits every method of the protocol's ``Settings.methods`` and evaluates each on the protocol's test targets;
    writes into the protocol's results (``methods``) and overlays. ``protocol``: the `protocol.Protocol` running it,
    its data prepared (settings, episode bank, test targets and their features, support draws)."""

    def __init__(self, protocol) -> None:
        self.p = protocol
        self.targets: list[Target] = []

    def comparison_data(self, model: ProxyPromptSAM) -> tuple[Backbone, Pairs, list[Target]]:
        """The plain backbone (no LoRA) the baselines use, the training pairs in every view and the test targets.
        Where the PPG's image encoder has no LoRA, its cached features are the plain backbone's and are shared."""
        self.p.prepare(model)
        torch.manual_seed(self.p.s.seed)  # random test backbones: the same weights as the PPG model's
        plain = build_backbone(self.p.s.backbone, self.p.s.checkpoint).eval()
        self.p.results["prompt_kinds"] = list(plain.prompt_kinds)
        b = self.p.bank

        def feats(x, cached):
            return cached if cached is not None else encode_each(plain, x)

        views = [Pairs(b.x[v], b.masks[v], feats(b.x[v], b.cache[v] if b.cached else None)) for v in range(b.views)]
        train = Pairs.cat(views)
        self.support_pairs = views[0]
        targets = [
            Target(s.image, x, geo, feats(x, f), labels)
            for s, (x, geo, f, labels) in zip(self.p.test_samples, self.p.test_cache, strict=True)
        ]
        return plain, train, targets

    def methods(self, main: ProxyPromptSAM | None) -> dict[str, tuple[Method, float]]:
        """Each method of ``Settings.methods``, fitted: name -> (method, seconds its training took)."""
        plain, train, self.targets = self.comparison_data(main or self.p.model())
        out = {}
        for key in self.p.s.methods:
            if key in PPG_METHODS:
                method = ProxyPrompt(main, box_refine=key == "ppg_box")
                out[key] = (method, self.p.results.get("train_seconds", 0.0))
                continue
            kwargs = {"steps": self.p.s.finetune_steps} if key == "finetune" else {}
            method = BASELINES[key](plain, **kwargs)
            t = time.time()
            method.fit(train, seed=self.p.s.seed)
            out[key] = (method, time.time() - t)
        return out

    def evaluate_method(self, method: Method, support: list[int], draw: int, keep: int = 0) -> dict:
        """Dice per object over the test split and per target (NaN where a target lacks the object, for paired
        comparisons between methods), with the method's seconds per target (after the shared encoder) and for the
        support set; the binary masks of the first ``keep`` targets."""
        t = time.perf_counter()
        method.set_support(self.support_pairs.select(support))
        setup = time.perf_counter() - t
        scores, seconds, masks = [], [], []
        for i, target in enumerate(tqdm(self.targets, desc=method.name, leave=False)):
            t = time.perf_counter()
            logits = method.predict(target, seed=self.p.s.seed * 10_000 + draw * 1_000 + i)
            seconds.append(time.perf_counter() - t)
            if logits.shape != target.truth.shape:
                raise RuntimeError(
                    f"{method.name} returned {tuple(logits.shape)}, expected {tuple(target.truth.shape)}"
                )
            pred = (logits > 0).float().cpu()
            scores.append(compute_dice(pred, target.truth, ignore_empty=True)[0].numpy())
            if i < keep:
                masks.append(pred[0])
        per_target = np.stack(scores)
        return {
            "dice": np.nanmean(per_target, axis=0).tolist(),
            "per_target": per_target.tolist(),
            "seconds": float(np.mean(seconds)),
            "setup_seconds": setup,
            "masks": masks,
        }

    def compare(self, main: ProxyPromptSAM | None) -> None:
        """Table 1 and Fig. 4 for every method: the same support draws, targets and metric."""
        s, res = self.p.s, self.p.results
        m_full = len(self.p.train_samples)
        res["methods"] = {}
        for key, (method, train_seconds) in tqdm(self.methods(main).items(), desc="methods"):
            row = {"name": method.name, "models_trained": method.models_trained(len(self.p.ids))}
            row |= {"needs": method.needs, "uses_support": method.uses_support, "train_seconds": train_seconds}
            if "table1" in s.studies:
                first = self.evaluate_method(method, self.p.support_draw(m_full, s.test_support, 0), 0, s.overlays)
                self.p.overlays[key] = first.pop("masks")
                row.update(first)
            if "fig4" in s.studies:
                draws = [self.p.support_draw(m_full, s.test_support, d + 1) for d in range(s.draws)]
                row["draws"] = [self.evaluate_method(method, idx, d + 1)["dice"] for d, idx in enumerate(draws)]
            res["methods"][key] = row
