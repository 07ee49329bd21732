"""The selective scan: parallel (pscan) and CUDA implementations against the sequential recurrence."""

from __future__ import annotations

import math

import pytest
import torch

from ppgseg.modeling.selective_scan import (
    kernel_available,
    selective_scan,
    selective_scan_ref,
    selective_scan_torch,
)


def _inputs(batch: int, d: int, length: int, n: int, *, device: str = "cpu", seed: int = 0) -> dict:
    """Random scan inputs in mamba-ssm's layout, with a negative real A as Mamba uses."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return {
        "u": rand(batch, d, length),
        "delta": rand(batch, d, length) * 0.5,
        "A": -torch.exp(rand(d, n) * 0.5),
        "B": rand(batch, n, length),
        "C": rand(batch, n, length),
        "D": rand(d),
        "z": rand(batch, d, length),
        "delta_bias": rand(d) * 0.1,
    }


OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"D": True}, id="D"),
    pytest.param({"z": True}, id="z"),
    pytest.param({"delta_bias": True, "delta_softplus": True}, id="bias-softplus"),
    pytest.param({"delta_softplus": True}, id="softplus"),
    pytest.param({"D": True, "z": True, "delta_bias": True, "delta_softplus": True}, id="all"),
]


def _call(fn, inputs: dict, options: dict) -> torch.Tensor:
    kwargs = {k: inputs[k] for k in ("D", "z", "delta_bias") if options.get(k)}
    if not options.get("delta_softplus"):
        # without softplus the step sizes must stay positive for a stable recurrence
        delta = inputs["delta"].abs()
    else:
        delta = inputs["delta"]
    return fn(
        inputs["u"],
        delta,
        inputs["A"],
        inputs["B"],
        inputs["C"],
        delta_softplus=bool(options.get("delta_softplus")),
        **kwargs,
    )


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("length", [1, 7, 16, 33])
def test_parallel_scan_matches_sequential(length: int, options: dict) -> None:
    """The Blelloch scan gives the sequential recurrence's numbers, also for lengths that are not powers of two."""
    inputs = _inputs(2, 6, length, 4)
    ref = _call(selective_scan_ref, inputs, options)
    out = _call(selective_scan_torch, inputs, options)
    assert out.shape == (2, 6, length)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_parallel_scan_gradients_match_sequential() -> None:
    inputs = _inputs(2, 6, 33, 4, seed=1)
    weight = torch.randn(2, 6, 33, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (selective_scan_ref, selective_scan_torch):
        u = inputs["u"].clone().requires_grad_(True)
        delta = inputs["delta"].clone().requires_grad_(True)
        y = fn(u, delta, inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"], inputs["delta_bias"], True)
        grads.append(torch.autograd.grad((y * weight).sum(), (u, delta)))
    (gu_ref, gd_ref), (gu, gd) = grads
    assert gu_ref.abs().sum() > 0 and gd_ref.abs().sum() > 0
    torch.testing.assert_close(gu, gu_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gd, gd_ref, atol=1e-5, rtol=1e-4)


def test_dispatcher_on_cpu_uses_torch_scan() -> None:
    inputs = _inputs(2, 6, 7, 4)
    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], inputs["z"])
    out = selective_scan(*args, delta_bias=inputs["delta_bias"], delta_softplus=True)
    expected = selective_scan_torch(*args, delta_bias=inputs["delta_bias"], delta_softplus=True)
    assert torch.equal(out, expected)


def _silu(x: float) -> float:
    return x / (1 + math.exp(-x))


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("full", [False, True], ids=["plain", "D-z-bias-softplus"])
def test_hand_computed_recurrence(full: bool) -> None:
    """1 channel, 1 state, length 3, written out in Python floats from Mamba's equations."""
    x = [0.5, -1.0, 2.0]
    dt = [0.3, 0.7, 0.2]
    a = -0.8
    b = [1.0, -0.5, 0.25]
    c = [0.6, 1.5, -2.0]
    d_skip, z, bias = 0.4, [0.3, -1.2, 2.0], 0.1

    h, expected = 0.0, []
    for t in range(3):
        step = _softplus(dt[t] + bias) if full else dt[t]
        h = math.exp(step * a) * h + step * b[t] * x[t]
        y = c[t] * h
        if full:
            y = (y + d_skip * x[t]) * _silu(z[t])
        expected.append(y)

    def tensor(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(1, 1, 3)

    extra = {}
    if full:
        extra = {
            "D": torch.tensor([d_skip]),
            "z": tensor(z),
            "delta_bias": torch.tensor([bias]),
            "delta_softplus": True,
        }
    args = (tensor(x), tensor(dt), torch.tensor([[a]]), tensor(b), tensor(c))
    for fn in (selective_scan_ref, selective_scan_torch, selective_scan):
        out = fn(*args, **extra)
        torch.testing.assert_close(out.view(3), torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"A": torch.zeros(5, 4)}, id="A-wrong-D"),
        pytest.param({"A": torch.zeros(6)}, id="A-1d"),
        pytest.param({"delta": torch.zeros(2, 6, 6)}, id="delta-shape"),
        pytest.param({"u": torch.zeros(6, 7), "delta": torch.zeros(6, 7)}, id="u-2d"),
        pytest.param({"B": torch.zeros(2, 3, 7)}, id="B-wrong-N"),
        pytest.param({"C": torch.zeros(2, 4, 8)}, id="C-wrong-L"),
        pytest.param({"B": torch.zeros(1, 4, 7)}, id="B-wrong-batch"),
    ],
)
@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_torch, selective_scan])
def test_bad_shapes_raise(fn, change: dict) -> None:
    inputs = _inputs(2, 6, 7, 4)
    args = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")} | change
    with pytest.raises(ValueError, match="must (both )?be"):
        fn(**args)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and kernel_available()), reason="needs CUDA and mamba-ssm's selective scan kernel"
)
@pytest.mark.parametrize(
    "batch,d,length,n", [(2, 6, 7, 4), (2, 16, 33, 8), (1, 64, 128, 16), (2, 384, 256, 16)], ids=str
)
def test_cuda_kernel_matches_sequential(batch: int, d: int, length: int, n: int) -> None:
    inputs = _inputs(batch, d, length, n, device="cuda")
    options = {"D": True, "z": True, "delta_bias": True, "delta_softplus": True}
    out = _call(selective_scan, inputs, options)
    ref = _call(selective_scan_ref, inputs, options)
    assert out.is_cuda and out.shape == (batch, d, length)
    torch.testing.assert_close(out.float(), ref, atol=1e-3, rtol=1e-3)
    plain = _call(selective_scan, inputs, {})
    torch.testing.assert_close(plain.float(), _call(selective_scan_ref, inputs, {}), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and kernel_available()), reason="needs CUDA and mamba-ssm's selective scan kernel"
)
def test_cuda_dispatcher_bad_shape_raises_value_error() -> None:
    inputs = _inputs(2, 6, 7, 4, device="cuda")
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(inputs["u"], inputs["delta"], torch.zeros(5, 4, device="cuda"), inputs["B"], inputs["C"])
