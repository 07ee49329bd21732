"""Selective scan of Mamba (Gu & Dao 2023), the recurrence behind the Vision Mamba encoder (paper Eq. 1-2).

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t,    y_t = C_t h_t + D x_t    (then gated by silu(z))

Three implementations share one signature (mamba-ssm's ``selective_scan_fn``):
- ``selective_scan_ref``: the plain sequential loop, the definition the others are tested against.
- ``selective_scan_torch``: a parallel (Blelloch) scan in pure PyTorch via ``mambapy.pscan``; runs anywhere.
- mamba-ssm's CUDA kernel, used by ``selective_scan`` when the package is installed and the tensors are on a GPU.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def _discretize(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, delta_bias: Tensor | None, delta_softplus: bool):
    """Zero-order hold for A, Euler for B, as in Mamba.

    Returns:
        dA: (Bt, L, D, N) = exp(Δ A);  dBu: (Bt, L, D, N) = Δ B x.
    """
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta = delta.transpose(1, 2)  # (Bt, D, L) -> (Bt, L, D)
    dA = torch.exp(delta.unsqueeze(-1) * A)  # (Bt, L, D, N)
    dBu = (delta * u.transpose(1, 2)).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)  # (Bt, L, D, N)
    return dA, dBu


def _readout(h: Tensor, u: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y = C h (+ D u) (* silu(z)); h (Bt, L, D, N) -> y (Bt, D, L)."""
    y = torch.einsum("bldn,bnl->bdl", h, C)
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, D, L), got {tuple(u.shape)} and {tuple(delta.shape)}")
    bt, d, length = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (D={d}, N), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (bt, n, length):
            raise ValueError(f"{name} must be (B={bt}, N={n}, L={length}), got {tuple(t.shape)}")


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The sequential recurrence, one step at a time.

    Args:
        u: (Bt, D, L) input sequence.  delta: (Bt, D, L) step sizes before bias/softplus.
        A: (D, N) state matrix (negative real).  B, C: (Bt, N, L) input-dependent projections.
        D: (D,) skip.  z: (Bt, D, L) gate.
    Returns:
        (Bt, D, L) outputs.
    """
    _check(u, delta, A, B, C)
    dA, dBu = _discretize(u.float(), delta.float(), A.float(), B.float(), delta_bias, delta_softplus)
    h = torch.zeros_like(dA[:, 0])  # (Bt, D, N)
    states = []
    for t in range(dA.shape[1]):
        h = dA[:, t] * h + dBu[:, t]
        states.append(h)
    y = _readout(torch.stack(states, dim=1), u.float(), C.float(), D, z)
    return y.to(u.dtype)


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Same numbers as `selective_scan_ref`, computed with a log-depth parallel scan (``mambapy.pscan``)."""
    from mambapy.pscan import pscan

    _check(u, delta, A, B, C)
    dA, dBu = _discretize(u.float(), delta.float(), A.float(), B.float(), delta_bias, delta_softplus)
    h = pscan(dA, dBu)  # (Bt, L, D, N)
    return _readout(h, u.float(), C.float(), D, z).to(u.dtype)


@functools.cache
def _kernel_import():
    """(mamba-ssm's fused kernel, None), or (None, why it cannot be used) where the package (which needs a CUDA
    build) is absent or fails to load."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or its CUDA extension failing to load on a CPU-only machine
        return None, f"mamba-ssm does not import ({type(err).__name__}: {err})"
    return selective_scan_fn, None


def _cuda_kernel():
    return _kernel_import()[0]


def kernel_available() -> bool:
    return torch.cuda.is_available() and _cuda_kernel() is not None


def scan_backend() -> tuple[str, str]:
    """Which scan GPU tensors get, and why: ("mamba-ssm kernel", ...) or ("pure-PyTorch scan", the reason)."""
    if not torch.cuda.is_available():
        return "pure-PyTorch scan", "no CUDA device (the kernel runs on GPU tensors only)"
    kernel, why = _kernel_import()
    if kernel is None:
        return "pure-PyTorch scan", why
    return "mamba-ssm kernel", "mamba-ssm imports and a CUDA device is present"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """mamba-ssm's CUDA kernel for GPU tensors when installed, else `selective_scan_torch`."""
    if u.is_cuda and kernel_available():
        _check(u, delta, A, B, C)  # the same ValueError as the torch path, not the kernel's RuntimeError
        kernel = _cuda_kernel()
        return kernel(
            u.contiguous(),
            delta.contiguous(),
            A.contiguous(),
            B.contiguous(),
            C.contiguous(),
            D=None if D is None else D.float(),
            z=None if z is None else z.contiguous(),
            delta_bias=None if delta_bias is None else delta_bias.float(),
            delta_softplus=delta_softplus,
        )
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
