"""Active learning: propose the unlabelled study the model is least sure of."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from monailabel.interfaces.tasks.strategy import Strategy

from lib.configs.proxy_prompt import ProxyPromptConfig
from ppgseg.io import read_image
from ppgseg.serving import Study

logger = logging.getLogger(__name__)


class LeastConfident(Strategy):
    """Scores each unlabelled study by the mask decoder's mean predicted IoU on a few slices, with one support set
    (the K labelled studies most similar to the unlabelled pool), and proposes the lowest. Scores are kept per
    study version and support set, so asking again costs only the new studies. Without a labelled study it
    proposes the unlabelled study least like the others (the most atypical one)."""

    def __init__(self, config: ProxyPromptConfig, datastore) -> None:
        super().__init__("Unlabelled study with the lowest predicted IoU (least confident)")
        self.app, self.datastore = config, datastore
        self.scores: dict[tuple[str, str], float] = {}

    def __call__(self, request: dict, datastore) -> dict | None:
        service = self.app.service()
        pool = [Study(i, Path(datastore.get_image_uri(i))) for i in sorted(datastore.get_unlabeled_images())]
        if not pool:
            return None
        labelled = list(self.app.labelled(datastore).values())
        vectors = np.stack([service.vector(s).numpy() for s in pool])
        if not labelled:
            pick = int(np.argmin(vectors @ vectors.mean(0)))
            return {"id": pool[pick].id, "reason": "no labelled study yet: the least typical unlabelled study"}
        k = min(self.app.num_support, len(labelled))
        centre = vectors.mean(0)
        ranked = sorted(labelled, key=lambda s: (-float(service.vector(s).numpy() @ centre), s.id))[:k]
        shown = sorted(set().union(*(service.shows(s) for s in ranked)))
        support = service.study_support(ranked, shown)
        scores = {}
        for study in pool:
            key = (study.stamp(), support.key)
            if key not in self.scores:
                self.scores[key] = service.confidence(read_image(study.image), support)
            scores[study.id] = self.scores[key]
        ranked_pool = sorted(scores, key=scores.get)
        pick = ranked_pool[0]
        logger.info(f"predicted IoU per unlabelled study: {scores}; proposing {pick}")
        by_id = {s.id: s for s in pool}
        for ahead in ranked_pool[:2]:  # the study proposed now, and the one proposed next: encoded in the background
            service.prefetch(by_id[ahead])
        return {"id": pick, "predicted_iou": scores[pick], "scores": scores}
