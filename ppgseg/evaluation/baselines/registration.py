"""Pairwise 2D registration by instance optimisation with MONAI's warp and losses: an affine stage, then a smooth
deformable stage on a coarse control grid. Used by the Med-PerSAM-style baseline to carry support masks onto a
target image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from torch import Tensor


class PairRegistration:
    """Find the displacement field that warps a moving image onto a fixed one.

    The sampling location of fixed pixel p is ``c + A (p - c) + t + d(p)``: t starts at the translation with the best
    normalised cross-correlation (exhaustive search), then A, t (an affine map about the centre c) and afterwards d
    (a displacement upsampled from a ``control`` x ``control`` grid) are optimised with Adam on the local normalised
    cross-correlation (MONAI's ``LocalNormalizedCrossCorrelationLoss``), d under MONAI's bending energy. Images are
    compared at ``size`` x ``size``, grey (mean over channels).

    Args:
        size: working resolution.
        affine_steps / deform_steps: Adam steps per stage.
        control: side of the deformable control grid.
        bending: weight of the bending energy.
        lr: Adam learning rate.
        max_shift: largest translation searched, in image sides.
        kernel: window of the local cross-correlation, in working pixels.
    """

    def __init__(
        self,
        *,
        size: int = 96,
        affine_steps: int = 60,
        deform_steps: int = 60,
        control: int = 12,
        bending: float = 10.0,
        lr: float = 0.01,
        max_shift: float = 0.25,
        kernel: int = 15,
    ) -> None:
        self.max_shift = max_shift
        self.size, self.affine_steps, self.deform_steps = size, affine_steps, deform_steps
        self.control, self.bending, self.lr = control, bending, lr
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=kernel)
        self.smoothness = BendingEnergyLoss()

    def _grey(self, x: Tensor) -> Tensor:
        x = F.interpolate(x.float().mean(1, keepdim=True), size=(self.size, self.size), mode="area")
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-6)

    def _best_shift(self, m: Tensor, f: Tensor) -> Tensor:
        """The translation (y, x), in image sides, of ``m`` that best correlates with ``f`` over shifts of up to
        ``max_shift`` of the side, searched exhaustively at a quarter of the working resolution."""
        m, f = (F.avg_pool2d(v, 4) for v in (m, f))
        n = m.shape[-1]
        r = int(self.max_shift * n)
        padded = F.pad(m, (r, r, r, r), mode="replicate")
        windows = padded.unfold(2, n, 1).unfold(3, n, 1)[0, 0]  # (2r+1, 2r+1, n, n): m shifted by (dy, dx)
        a = windows - windows.mean(dim=(-2, -1), keepdim=True)
        b = f[0, 0] - f.mean()
        ncc = (a * b).sum(dim=(-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm()).clamp_min(1e-6)
        dy, dx = divmod(int(ncc.argmax()), 2 * r + 1)
        # window (dy, dx) shows m at p + (dy - r, dx - r): the sampling location moves by that much
        return torch.tensor([dy - r, dx - r], dtype=torch.float32) / n

    def __call__(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """(1, C, S, S) moving and fixed images -> (1, 2, S, S) displacement field in pixels (MONAI ``Warp``'s
        convention: channels in (y, x) order) such that ``Warp()(moving, ddf)`` lies on ``fixed``."""
        if moving.shape != fixed.shape or moving.dim() != 4 or moving.shape[0] != 1:
            raise ValueError(
                f"moving and fixed must both be (1, C, S, S), got {tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        m, f = self._grey(moving), self._grey(fixed)
        n = self.size
        ys, xs = torch.meshgrid(
            torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij"
        )
        q = (torch.stack([ys, xs]) - (n - 1) / 2) / n  # (2, n, n) centred coordinates, (y, x), unit = image side
        linear = torch.zeros(2, 2, requires_grad=True)  # A - I
        shift = self._best_shift(m, f).requires_grad_(True)  # t, started at the best whole-image translation
        coarse = torch.zeros(1, 2, self.control, self.control, requires_grad=True)  # d on the control grid

        def field(with_deform: bool) -> Tensor:
            ddf = torch.einsum("ij,jhw->ihw", linear, q) + shift[:, None, None]  # (2, n, n)
            ddf = ddf[None]
            if with_deform:
                ddf = ddf + F.interpolate(coarse, size=(n, n), mode="bicubic", align_corners=True)
            return ddf  # unit = image side

        with torch.enable_grad():
            for params, steps, deform in (
                ([linear, shift], self.affine_steps, False),
                ([coarse], self.deform_steps, True),
            ):
                opt = torch.optim.Adam(params, lr=self.lr)
                for _ in range(steps):
                    ddf = field(deform)
                    loss = self.similarity(self.warp(m, ddf * n), f)
                    if deform:
                        loss = loss + self.bending * self.smoothness(ddf)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        with torch.no_grad():
            ddf = field(True)  # unit = image side
            side = moving.shape[-1]
            return F.interpolate(ddf, size=moving.shape[-2:], mode="bilinear", align_corners=True) * side

    def apply(self, images: Tensor, ddf: Tensor) -> Tensor:
        """Warp (1, N, S, S) images (or masks) with a field from ``__call__``."""
        return self.warp(images.float(), ddf)
