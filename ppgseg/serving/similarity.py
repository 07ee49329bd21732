"""Which labelled studies look like a target: backbone-feature vectors of studies, kept on disk per image version,
and the label ids each labelled study shows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.intensity import to_byte_range
from ..inference.slices import as_slices
from ..io import read_image
from ..modeling.proxy_sam import ProxyPromptSAM
from .studies import Study, sample_slices


class StudySimilarity:
    """Similarity of studies for ``model``, slicing volumes along ``axis``; vectors kept in ``cache_dir/vectors.pt``.
    Not thread-safe: call under the service's lock."""

    def __init__(self, model: ProxyPromptSAM, cache_dir: str | Path, axis: int) -> None:
        self.model, self.cache_dir, self.axis = model, Path(cache_dir), axis
        path = self.cache_dir / "vectors.pt"
        self._vectors: dict[str, Tensor] = torch.load(path, weights_only=True) if path.is_file() else {}
        self._shows: dict[str, set[int]] = {}

    def vector(self, study: Study, image: Tensor | None = None) -> Tensor:
        """The study's similarity vector: unit-norm mean of the backbone's pooled features on a few slices
        (computed once per image version, kept on disk). ``image``: the study's image when already read."""
        key = f"{self.model.config.get('backbone')}|{self.axis}|{Study(study.id, study.image).stamp()}"
        if key not in self._vectors:
            slices = as_slices(read_image(study.image) if image is None else image, self.axis)
            pooled = []
            for z in sample_slices(len(slices)):
                x, _ = self.model.backbone.preprocess(to_byte_range(slices[z])[None])
                with torch.no_grad():
                    pooled.append(self.model.encode_images(x.to(self.model.backbone.device)).embed.mean(dim=(2, 3))[0])
            self._vectors[key] = F.normalize(torch.stack(pooled).mean(0).cpu(), dim=0)
            self._save()
        return self._vectors[key]

    def most_similar(
        self, target: Study, candidates: Sequence[Study], k: int, image: Tensor | None = None
    ) -> list[Study]:
        """The ``k`` candidates most similar to ``target`` (cosine of `vector`), most similar first."""
        v = self.vector(target, image)
        return sorted(candidates, key=lambda c: (-float(v @ self.vector(c)), c.id))[:k]

    def shows(self, study: Study) -> set[int]:
        """Label ids present in a labelled study's label file (cached per file version)."""
        key = study.stamp()
        if key not in self._shows:
            label = read_image(study.label)
            self._shows[key] = {int(v) for v in torch.unique(label.as_tensor()).tolist() if v != 0}
        return self._shows[key]

    def _save(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / "vectors.pt.tmp"
        torch.save(self._vectors, tmp)
        tmp.replace(self.cache_dir / "vectors.pt")
