"""How masks are decoded: one policy object, built once where the user sets it (a bundle config, the app's
``--conf``) and passed to whatever decodes, checked here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodePolicy:
    """Decoding options of the inference paths.

    Per slice or image (`ProxyPromptSAM.segment_features`):
        min_carried: an object that the support carries to no part of a slice (its carried mask below this
            everywhere) is answered empty there without running the mask decoder; 0 decodes every object.
        box_refine: each mask refined by a second decoder pass prompted with its own box
            (`ProxyPromptSAM.refine_with_box`): one more decode per object and slice.
    Across a volume's slices (`inference.slices.label_slices`):
        z_stride: > 1 decodes sparsely (`inference.sparse.sparse_slice_logits`): every ``z_stride``-th slice, then only
            where two decoded slices disagree; agreeing gaps are interpolated. Needs the slices' encoder features
            computed earlier (a study encoding cache). 1 decodes every slice.
        agree: the mask Dice at which two decoded slices count as agreeing (above 1: never).
        chunk: slices per batch.
    """

    min_carried: float = 0.0
    box_refine: bool = False
    z_stride: int = 1
    agree: float = 0.7
    chunk: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.min_carried < 1:
            raise ValueError(f"min_carried must be in [0, 1), got {self.min_carried}")
        if not isinstance(self.z_stride, int) or self.z_stride < 1:
            raise ValueError(f"z_stride must be an integer >= 1 (1: decode every slice), got {self.z_stride!r}")
        if self.agree < 0:
            raise ValueError(f"agree must be >= 0, got {self.agree}")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")

    @property
    def sparse(self) -> bool:
        return self.z_stride > 1

    def dense(self) -> DecodePolicy:
        """The same policy decoding every slice (where no encoder features were computed earlier)."""
        return DecodePolicy(self.min_carried, self.box_refine, 1, self.agree, self.chunk)


EVERY_SLICE = DecodePolicy()  # the default: every object decoded on every slice, no refinement
