"""The PPG's modules on their own: Selective map, Bridge Unit, Vision Mamba, CCM."""

from __future__ import annotations

import math

import pytest
import torch

from ppgseg.modeling.bridge import BridgeUnit, CrossObjectCBAM
from ppgseg.modeling.colorization import ContextualColorization, PooledContext
from ppgseg.modeling.generator import ProxyPromptGenerator
from ppgseg.modeling.selective_map import MeanContext, SelectiveMap
from ppgseg.modeling.vision_mamba import VisionMambaEncoder

B, K, HW, C, N = 2, 3, 16, 8, 2


def _selective_inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f_x = torch.randn(B, HW, C, generator=g, dtype=dtype)
    f_sup = torch.randn(K * HW, C, generator=g, dtype=dtype)
    values = torch.randn(K * HW, N * C, generator=g, dtype=dtype)  # e.g. A_agg of N objects side by side
    return f_x, f_sup, values


def test_selective_map_matches_paper_formula() -> None:
    """Eq. 6-7 with the (KHW, HW) map materialised: softmax over support positions, E_ctx = A_agg . softmax."""
    f_x, f_sup, values = _selective_inputs()
    out = SelectiveMap()(f_x, f_sup, values)
    assert out.shape == (B, HW, N * C)
    for b in range(B):
        sq_norm = (f_sup**2).sum(dim=1, keepdim=True)  # (KHW, 1): one squared norm per support position
        selective = (2 * f_sup @ f_x[b].T - sq_norm) / math.sqrt(C)  # (KHW, HW)
        weights = torch.softmax(selective, dim=0)  # over the K*H*W support positions
        assert torch.allclose(weights.sum(dim=0), torch.ones(HW, dtype=torch.float64))
        e_ctx = values.T @ weights  # (D, KHW) @ (KHW, HW) -> (D, HW)
        torch.testing.assert_close(out[b], e_ctx.T, atol=1e-10, rtol=1e-10)


def test_selective_map_reads_nearest_support_patch() -> None:
    """With a target patch equal to one (well-separated) support patch, it reads that patch's values."""
    f_sup = 10 * torch.randn(K * HW, C, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    values = torch.randn(K * HW, C, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f_x = f_sup[[5, 20]].unsqueeze(0)  # (1, 2, C): copies of support positions 5 and 20
    out = SelectiveMap()(f_x, f_sup, values)
    torch.testing.assert_close(out[0], values[[5, 20]], atol=1e-6, rtol=1e-6)


def test_mean_context_is_mean_over_support_pairs() -> None:
    f_x, f_sup, values = _selective_inputs()
    out = MeanContext()(f_x, f_sup, values)
    assert out.shape == (B, HW, N * C)
    expected = torch.stack([values[k * HW : (k + 1) * HW] for k in range(K)]).mean(dim=0)  # (HW, D)
    for b in range(B):
        torch.testing.assert_close(out[b], expected)


@pytest.fixture(scope="module")
def bridge() -> BridgeUnit:
    torch.manual_seed(0)
    return BridgeUnit(feat_dim=16, vim_dim=8).eval()


def _bridge_inputs(n: int, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, 16, 4, 4, generator=g), torch.randn(k, n, 8, 4, 4, generator=g)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bridge_any_number_of_objects(bridge: BridgeUnit, n: int) -> None:
    """One set of weights serves any N."""
    f_sup, v = _bridge_inputs(n)
    with torch.no_grad():
        out = bridge(f_sup, v)
    assert out.shape == (n, 2 * 4 * 4, 16)
    assert torch.isfinite(out).all()


def test_bridge_is_permutation_equivariant(bridge: BridgeUnit) -> None:
    f_sup, v = _bridge_inputs(3)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = bridge(f_sup, v)
        out_perm = bridge(f_sup, v[:, perm])
    torch.testing.assert_close(out_perm, out[perm], atol=1e-5, rtol=1e-5)


def test_bridge_objects_communicate(bridge: BridgeUnit) -> None:
    """Changing object 1's Vim features changes object 0's aggregated tokens (CBAM pools over objects)."""
    f_sup, v = _bridge_inputs(2)
    v2 = v.clone()
    v2[:, 1] = torch.randn(v2[:, 1].shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out, out2 = bridge(f_sup, v), bridge(f_sup, v2)
    assert not torch.allclose(out2[0], out[0], atol=1e-4)
    assert not torch.allclose(out2[1], out[1], atol=1e-4)


def test_cross_object_cbam_shape() -> None:
    torch.manual_seed(0)
    cbam = CrossObjectCBAM(16)
    x = torch.randn(2, 3, 16, 5, 6)
    assert cbam(x).shape == x.shape


def _vim(patch: int, **kw) -> VisionMambaEncoder:
    torch.manual_seed(0)
    return VisionMambaEncoder(img_size=32, grid=8, patch=patch, dim=16, depth=1, d_state=4, **kw).eval()


@pytest.mark.parametrize("patch", [4, 8], ids=["on-grid", "coarser-upsampled"])
def test_vision_mamba_output_shape(patch: int) -> None:
    vim = _vim(patch)
    assert vim.tokens_side == 32 // patch
    with torch.no_grad():
        out = vim(torch.randn(3, 4, 32, 32))
    assert out.shape == (3, 16, 8, 8)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "img_size,patch",
    [(32, 5), (32, 2), (30, 10)],
    ids=["not-dividing-input", "finer-than-grid", "not-dividing-grid"],
)
def test_vision_mamba_bad_patch_raises(img_size: int, patch: int) -> None:
    with pytest.raises(ValueError, match="vim patch"):
        VisionMambaEncoder(img_size=img_size, grid=8, patch=patch, dim=16, depth=1)


def _first_token_grad_at_last_patch(vim: VisionMambaEncoder, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    # one channel, not the sum over channels: the output is normalised over its channels, so their sum is a constant
    # whose gradient is zero (up to rounding) whatever the scan does
    (grad,) = torch.autograd.grad(vim(x)[:, 0, 0, 0].sum(), x)
    return grad[..., -4:, -4:]  # the last patch (last token in raster order)


def test_vision_mamba_is_bidirectional() -> None:
    """The first token's output depends on the last token's input, through the backward scan only."""
    vim = _vim(4)
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    x2 = x.clone()
    x2[..., -4:, -4:] += 1.0
    with torch.no_grad():
        # Mamba's initial step sizes are small, so the far-away effect is small (~1e-6) but real: see the control
        assert not torch.equal(vim(x)[..., 0, 0], vim(x2)[..., 0, 0])
    assert _first_token_grad_at_last_patch(vim, x).abs().sum() > 0

    # control: without the backward branch the first token cannot see the last one (the forward scan is causal)
    vim.blocks[0].mixer.directions[1].forward = lambda u, z: torch.zeros_like(u)
    with torch.no_grad():
        assert torch.equal(vim(x)[..., 0, 0], vim(x2)[..., 0, 0])
        assert not torch.equal(vim(x)[..., -1, -1], vim(x2)[..., -1, -1])  # the last token still sees its input
    assert torch.count_nonzero(_first_token_grad_at_last_patch(vim, x)) == 0


def test_contextual_colorization_shape() -> None:
    torch.manual_seed(0)
    ccm = ContextualColorization(C, heads=2, ffn_dim=16).eval()
    f_x, ctx = torch.randn(2, 3, 64, C), torch.randn(2, 3, 64, C)
    with torch.no_grad():
        out = ccm(f_x, ctx, (8, 8))
    assert out.shape == (2, 3, 4, C)
    assert torch.isfinite(out).all()


def test_pooled_context_shape_and_values() -> None:
    ctx = torch.randn(2, 3, 64, C)
    out = PooledContext()(torch.randn(2, 3, 64, C), ctx, (8, 8))
    assert out.shape == (2, 3, 4, C)
    grid = ctx.view(2, 3, 8, 8, C)
    torch.testing.assert_close(out[:, :, 0], grid[:, :, :4, :4].mean(dim=(2, 3)))  # top-left 4x4 block
    torch.testing.assert_close(out[:, :, 3], grid[:, :, 4:, 4:].mean(dim=(2, 3)))  # bottom-right 4x4 block


def test_generator_grid_must_be_multiple_of_four() -> None:
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="multiple of 4"):
        ProxyPromptGenerator(
            context_encoder=VisionMambaEncoder(img_size=36, grid=6, patch=6, dim=8, depth=1),
            bridge=BridgeUnit(C, 8),
            selector=SelectiveMap(),
            colorizer=PooledContext(),
            grid=6,
        )


def test_generator_carries_the_support_masks_to_the_target() -> None:
    """P has H*W/16 tokens per object, and the support masks read through Eq. 7 land where the target matches."""
    torch.manual_seed(0)
    gen = ProxyPromptGenerator(
        context_encoder=VisionMambaEncoder(img_size=32, grid=8, patch=4, dim=8, depth=1),
        bridge=BridgeUnit(64, 8),
        selector=SelectiveMap(),
        colorizer=PooledContext(),
        grid=8,
    )
    images = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 2, 32, 32)
    masks[0, 0, :16] = 1  # object 0: top half; object 1: bottom-right quarter
    masks[0, 1, 16:, 16:] = 1
    features = torch.randn(1, 64, 8, 8)  # wide enough that each position is far from the others
    support = gen.encode_support(images, masks, features)
    tokens, coarse = gen(features, support)  # the target *is* the support image: every position finds itself
    assert tokens.shape == (1, 2, 4, 64) and coarse.shape == (1, 2, 8, 8)
    expected = torch.nn.functional.adaptive_avg_pool2d(masks, 8)
    torch.testing.assert_close(coarse, expected, atol=1e-3, rtol=0)
