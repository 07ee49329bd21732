"""The registration route's on-the-fly fine-tune: the labelled studies registered onto each other (each one the target
of the others, leave one out), and the model trained to turn the others' registered vote into that study's own
labels, slice by slice, with the supports and the prompt the route gives a new study (`segment_registered`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor

from ..backbones.base import Features
from ..inference.atlas import AtlasRegistration, Registered, atlas_slice, to_sitk, vote
from ..inference.slices import as_slices
from ..inference.volume import Atlas, LabelledSlices, decode_with_prior, in_frame, position_supports
from ..io import voxel_spacing
from ..modeling.generator import Selected
from ..modeling.proxy_sam import ProxyPromptSAM
from .finetune import snapshot
from .loop import make_optimizer

FAR = -(10**6)  # a study's position in itself: no slice of it is ever near (it is the target, not a support)


def cross_register(
    registration: AtlasRegistration,
    atlases: Sequence[Atlas],
    label_ids: Sequence[int],
    spacings: Sequence[Sequence[float]] | None = None,
) -> list[list[Registered]]:
    """For each of ``atlases``, every other one registered onto it (in their order): K (K - 1) registrations."""
    if len(atlases) < 2:
        raise ValueError(f"the registration fine-tune needs at least 2 labelled studies, got {len(atlases)}")
    spacings = spacings or [voxel_spacing(a.image) for a in atlases]
    images = [to_sitk(a.image[0], s) for a, s in zip(atlases, spacings, strict=True)]
    labels = [a.label.numpy() for a in atlases]
    return [
        [registration.register(images[i], images[j], labels[j], label_ids) for j in range(len(atlases)) if j != i]
        for i in range(len(atlases))
    ]


class RegisteredEpisodes:
    """Episodes of the registration route on labelled studies: (study i, slice z) prompted as a new study's slice
    would be, by the other studies' slices at its position and their registered vote in the dense slot, with study
    i's own masks as the truth. Only slices where the vote asks for an object (a half or more somewhere) are
    episodes, and only the objects it asks for are scored: the route decodes nothing else.

    Args:
        model: the model being trained (its encoder frozen: the atlases' features are reused).
        atlases: the labelled studies, each encoded along ``axis``.
        registered: `cross_register`'s result for them.
        label_ids: the objects.
        axis: the slicing axis.
        spacings: the studies' voxel spacings (default: as read).
    """

    def __init__(
        self,
        model: ProxyPromptSAM,
        atlases: Sequence[Atlas],
        registered: Sequence[Sequence[Registered]],
        label_ids: Sequence[int],
        axis: int,
        spacings: Sequence[Sequence[float]] | None = None,
    ) -> None:
        if model.encoder_trains:
            raise ValueError("registered episodes reuse the atlases' encoder features: the encoder must be frozen")
        spacings = spacings or [voxel_spacing(a.image) for a in atlases]
        self.atlases, self.k = list(atlases), len(atlases)
        self.bank = LabelledSlices.cat(
            [LabelledSlices.of(model, a.encoded, a.label, label_ids, axis, study=s) for s, a in enumerate(atlases)]
        )
        self.supports, self.priors, self.items = [], [], []
        for i, a in enumerate(atlases):
            others = [j for j in range(self.k) if j != i]
            shape, z_all = a.label.shape, len(a.encoded)
            at = torch.full((z_all, self.k), FAR)
            for r, j in zip(registered[i], others, strict=True):
                where = [atlas_slice(r, shape, axis, z, spacings[i], spacings[j]) for z in range(z_all)]
                at[:, j] = torch.tensor(where)
            self.supports.append(position_supports(self.bank, at, a.encoded.vectors))
            prior = as_slices(torch.from_numpy(vote(registered[i])), axis)  # (Z, N, H, W)
            self.priors.append(in_frame(model, prior, a.encoded.size))
            asks = self.priors[i].flatten(2).amax(2) >= 0.5
            self.items += [(i, z) for z in range(z_all) if self.supports[i][z] and bool(asks[z].any())]
        if not self.items:
            raise ValueError("the registered labels ask for no object on any slice: check the labels and label ids")

    def __len__(self) -> int:
        return len(self.items)

    def logits(self, model: ProxyPromptSAM, item: int) -> tuple[Tensor, Tensor]:
        """Episode ``item`` -> (low-res logits, truth), both (1, n, h, w) over the n objects the prior asks for."""
        i, z = self.items[item]
        device = model.backbone.device
        f = self.atlases[i].encoded.features.select([z]).to(device)
        selected = model.select(f, self.bank.embedding(model, self.supports[i][z]))
        row = int(((self.bank.study == i) & (self.bank.index == z)).nonzero()[0, 0])
        return prior_episode(model, f, selected, self.priors[i][z : z + 1], self.bank.masks[row : row + 1])


def prior_episode(
    model: ProxyPromptSAM, f: Features, selected: Selected, prior: Tensor, truth: Tensor
) -> tuple[Tensor, Tensor]:
    """One slice decoded with ``prior`` (1, N, S, S) fractions in the dense slot (`decode_with_prior`) -> (low-res
    logits, ``truth`` (1, N, S, S) masks brought to their size), both over the objects the prior asks for (a half
    or more somewhere): the route decodes nothing else."""
    device = model.backbone.device
    prior = prior.to(device)
    asked = prior.flatten(2).amax(2) >= 0.5
    low, _ = decode_with_prior(model, f, selected, prior, asked)
    truth = F.interpolate(truth.to(device), size=low.shape[-2:], mode="area") > 0.5
    keep = asked[0]
    return low[:, keep], truth[:, keep].float()


@dataclass
class RegistrationTuned:
    """What a registration fine-tune did: episodes trained, the loss of fixed check episodes before and after,
    whether the trained weights were kept (not when the check loss did not fall), and its seconds."""

    episodes: int
    before: float
    after: float
    kept: bool
    seconds: float

    def describe(self, base: str, studies: int) -> str:
        what = (f"registration fine-tune on {studies} labelled studies ({self.episodes} episodes, {self.seconds:.0f} "
                f"s, check loss {self.before:.3f} -> {self.after:.3f})")  # fmt: skip
        return f"{base} + {what}" if self.kept else f"{base} (kept: a {what} did not help)"


class RegistrationFineTune:
    """Train a model's trainable weights (PPG + LoRA) on `RegisteredEpisodes` (or `PropagationEpisodes`), AdamW,
    Dice + cross-entropy on the decoder's low-res logits.

    Args:
        episodes: training episodes (each one slice of one study).
        lr: AdamW's learning rate.
        seed: the episode order and the check episodes.
        checks: fixed episodes whose loss decides whether the trained weights are kept.
    """

    def __init__(self, *, episodes: int = 400, lr: float = 1e-3, seed: int = 0, checks: int = 16) -> None:
        if episodes < 1 or checks < 1:
            raise ValueError(f"episodes and checks must be >= 1, got {episodes} and {checks}")
        self.episodes, self.lr, self.seed, self.checks = episodes, lr, seed, checks
        self.loss = DiceCELoss(sigmoid=True)

    @staticmethod
    def applies(model) -> bool:
        """Whether the fine-tune can train ``model``: its encoder frozen (the studies' features are reused) and a
        decoder between the prompt and the masks (not the `coarse` route)."""
        route = getattr(model, "route", None)
        return route is not None and route.uses_decoder and not model.encoder_trains

    def __call__(self, model: ProxyPromptSAM, data: RegisteredEpisodes, *, seconds: float | None = None):
        """Train ``model`` in place for ``self.episodes`` episodes (or until ``seconds`` have passed) and leave in it
        the trained weights, or its start weights where the check loss did not fall. Returns `RegistrationTuned`."""
        if not self.applies(model):
            raise ValueError(
                "the registration fine-tune trains the decoder's refinement of the registered vote, on the studies' "
                "cached features: the model's prompt route has no decoder (coarse), or its encoder trains"
            )
        start = time.monotonic()
        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        checks = rng.choice(len(data), min(self.checks, len(data)), replace=False).tolist()
        start_state = snapshot(model)
        before = self.check(model, data, checks)
        optimizer = make_optimizer(model, lr=self.lr, kind="adamw")
        model.train()
        done = 0
        for item in rng.integers(len(data), size=self.episodes).tolist():
            if done and seconds is not None and time.monotonic() - start >= seconds:
                break
            loss = self.loss(*data.logits(model, item))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
        after = self.check(model, data, checks)
        kept = after < before
        if not kept:
            model.load_state_dict(start_state, strict=False)
        model.eval()
        return RegistrationTuned(done, before, after, kept, time.monotonic() - start)

    def check(self, model: ProxyPromptSAM, data: RegisteredEpisodes, items: Sequence[int]) -> float:
        """Mean loss of the episodes ``items`` (no gradient, eval mode)."""
        model.eval()
        with torch.no_grad():
            return float(np.mean([self.loss(*data.logits(model, i)).item() for i in items]))
