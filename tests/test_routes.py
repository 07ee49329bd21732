"""Prompt routes: P alone (Eq. 12, sparse or dense), P + carried masks, and the ablations; tiles at native
resolution against one pass."""

from __future__ import annotations

import pytest
import torch
from test_model import H, W, make_support, make_targets, tiny_model

from ppgseg import load_ppg, save_ppg
from ppgseg.data.contract import Sample
from ppgseg.data.tiles import starts, tile_pairs, tile_samples
from ppgseg.inference.tiles import segment_tiled
from ppgseg.modeling.prompt_route import ROUTES


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_route_segments_at_the_targets_size(route: str) -> None:
    model = tiny_model(prompt=route)
    images, masks = make_support(2, 2)
    with torch.no_grad():
        logits, iou = model.segment(make_targets(2), model.encode_support(images, masks), with_iou=True)
    assert logits.shape == (2, 2, H, W) and iou.shape == (2, 2) and torch.isfinite(logits).all()
    assert model.config["prompt"] == route


def test_paper_route_reads_p_only_and_transfer_reads_both() -> None:
    """Changing the carried masks (through the support masks' values only, not P) moves `mask` and `coarse`, and
    leaves `paper` untouched once P is held fixed: the decoder of `paper` sees P alone."""
    model = tiny_model(prompt="paper")
    images, masks = make_support(2, 1)
    with torch.no_grad():
        feats = model.encode_images(model.backbone.preprocess(make_targets(1))[0])
        sup = model.encode_support(images, masks)
        tokens, coarse = model.generator(model.to_grid(feats.embed), sup)
        for name, moves in (("paper", False), ("paper_dense", False), ("transfer", True), ("mask", True)):
            route = ROUTES[name]()
            a = route(model.backbone, feats, tokens, coarse)
            b = route(model.backbone, feats, tokens, 1 - coarse)
            assert (not torch.allclose(a, b)) == moves, name
            if name != "mask":
                assert not torch.allclose(a, route(model.backbone, feats, 2 * tokens, coarse)), name


def test_coarse_route_is_the_carried_mask_without_decoder() -> None:
    model = tiny_model(prompt="coarse")
    assert not any(p.requires_grad for p in model.route.parameters())
    images, masks = make_support(1, 1)
    with torch.no_grad():  # the target is the support image: the carried mask is (nearly) the mask itself
        logits = model.segment(images, model.encode_support(images, masks))
    agree = ((logits > 0).float() == masks).float().mean()
    assert agree > 0.9


def test_checkpoint_records_its_route(tmp_path) -> None:
    path = save_ppg(tiny_model(prompt="paper"), tmp_path / "paper.pt")
    assert torch.load(path, weights_only=True)["config"]["prompt"] == "paper"
    load_ppg(tiny_model(prompt="paper"), path)
    with pytest.raises(ValueError, match="prompt"):
        load_ppg(tiny_model(prompt="transfer"), path)


def test_unknown_route_is_refused() -> None:
    with pytest.raises(ValueError, match="prompt must be one of"):
        tiny_model(prompt="clicks")


# --- tiles -------------------------------------------------------------------------------------------------------
def test_tile_offsets_cover_the_image_with_overlap() -> None:
    assert starts(100, 128, 0.25) == [0]
    s = starts(565, 256, 0.25)
    assert s[0] == 0 and s[-1] == 565 - 256 and all(b - a <= 192 for a, b in zip(s, s[1:], strict=False))
    with pytest.raises(ValueError, match="overlap"):
        starts(300, 128, 1.0)


def test_tiles_equal_one_pass_on_an_image_that_fits_one_tile(model_for_tiles) -> None:
    model = model_for_tiles
    images, masks = make_support(2, 2)
    targets = make_targets(2)
    with torch.no_grad():
        support = model.encode_support(images, masks)
        one = model.segment(targets, support)
        tiled = segment_tiled(model, targets, support, tile=128)
    torch.testing.assert_close(tiled, one, atol=1e-4, rtol=1e-4)


def test_tiles_of_a_large_image_and_of_support_pairs(model_for_tiles) -> None:
    model = model_for_tiles
    images, masks = make_support(2, 1, h=200, w=150)
    xs, ms = tile_pairs(images, masks, 128)
    assert xs.shape == (2 * 4, 3, 128, 128) and ms.shape == (2 * 4, 1, 128, 128)
    torch.testing.assert_close(xs[:2], images[..., :128, :128])
    calls = []
    real = model.backbone.encode
    model.backbone.encode = lambda x: calls.append(x.shape[0]) or real(x)
    try:
        with torch.no_grad():
            support = model.encode_support(xs, ms)
            target = torch.randint(0, 256, (1, 3, 192, 240), dtype=torch.uint8)
            logits = segment_tiled(model, target, support, tile=128)
    finally:
        model.backbone.encode = real
    assert logits.shape == (1, 1, 192, 240) and torch.isfinite(logits).all()
    windows = len(starts(192, 128, 0.25)) * len(starts(240, 128, 0.25))
    assert sum(calls) == 8 + windows  # the 8 support tiles once, then one encoder pass per target tile
    sample = Sample(images[0].float(), masks[0, 0].long(), "a.png")
    tiles = tile_samples([sample], 128)
    assert len(tiles) == 4 and all(t.source.startswith("a.png#tile:") for t in tiles)
    assert tiles[-1].label.shape == (128, 128) and torch.equal(tiles[-1].label, sample.label[72:, 22:])


@pytest.fixture(scope="module")
def model_for_tiles():
    return tiny_model()


def test_p_only_routes_give_the_ppg_the_carried_masks_and_train_them() -> None:
    paper, transfer = tiny_model(prompt="paper"), tiny_model(prompt="transfer")
    assert paper.generator.mask_context is not None and transfer.generator.mask_context is None
    images, masks = make_support(2, 2)
    paper.train()
    logits = paper(make_targets(1), images, masks)
    logits.sum().backward()
    assert paper.generator.mask_context.embed.grad is not None
    assert paper.generator.mask_context.embed.grad.abs().sum() > 0
