"""ProxyPromptSAM end to end on random tiny backbones: shapes, what trains, caching, checkpoints, input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ppgseg import build_model, load_ppg, save_ppg
from ppgseg.backbones import build_sam_tiny
from ppgseg.backbones.base import mask_box
from ppgseg.lora import add_lora, is_trainable, lora_disabled, merged_lora
from ppgseg.modeling.colorization import ContextualColorization, PooledContext
from ppgseg.modeling.selective_map import MeanContext, SelectiveMap

H, W = 96, 120  # not square and not the backbone's 128: exercises resize and padding


def make_support(k: int, n: int, *, h: int = H, w: int = W, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K random uint8 images and (K, N, H, W) 0/1 masks, each object a nonempty rectangle."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (k, 3, h, w), dtype=torch.uint8, generator=g)
    masks = torch.zeros(k, n, h, w)
    for i in range(k):
        for j in range(n):
            y0 = int(torch.randint(0, h // 2, (1,), generator=g))
            x0 = int(torch.randint(0, w // 2, (1,), generator=g))
            dy, dx = (int(v) for v in torch.randint(12, h // 2, (2,), generator=g))
            masks[i, j, y0 : y0 + dy, x0 : x0 + dx] = 1
    return images, masks


def make_targets(b: int, channels: int = 3, *, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, channels, H, W), dtype=torch.uint8, generator=g)


def tiny_model(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("sam_tiny", "tiny", pretrained=False, **kwargs)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """Shared read-only model (eval mode); tests that change weights build their own."""
    return tiny_model()


@pytest.fixture(scope="module")
def sam2_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("sam2", "tiny", pretrained=False, backbone_kwargs={"image_size": 256})


# --- shapes ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("n", [1, 3])
def test_segment_shapes(model, k: int, n: int) -> None:
    images, masks = make_support(k, n)
    with torch.no_grad():
        support = model.encode_support(images, masks)
        assert support.num_objects == n
        assert support.keys.shape == (k * 8 * 8, 32)
        assert support.a_agg.shape == (n, k * 8 * 8, 32)
        logits = model.segment(make_targets(2), support)
    assert logits.shape == (2, n, H, W)
    assert torch.isfinite(logits).all()


def test_grey_targets_and_support(model) -> None:
    images, masks = make_support(2, 2)
    with torch.no_grad():
        support = model.encode_support(images[:, :1], masks)
        grey = make_targets(2, channels=1)
        logits = model.segment(grey, support)
        # a grey image is its 3-channel replica
        torch.testing.assert_close(logits, model.segment(grey.expand(-1, 3, -1, -1), support))
    assert logits.shape == (2, 2, H, W)
    assert torch.isfinite(logits).all()


# --- what trains -----------------------------------------------------------------------------------------------------
def test_gradients_reach_exactly_ppg_and_lora() -> None:
    model = tiny_model().train()
    images, masks = make_support(2, 2)
    logits = model(make_targets(2), images, masks)
    target = (torch.rand(logits.shape, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    F.binary_cross_entropy_with_logits(logits, target).backward()

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if is_trainable(name)}
    assert all(name.startswith("generator.") or ".lora_" in name for name in trainable)
    assert any(n.startswith("generator.") for n in trainable)
    assert any(".lora_" in n and n.startswith("backbone.model.image_encoder.") for n in trainable)
    assert any(".lora_" in n and n.startswith("backbone.model.mask_decoder.") for n in trainable)

    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if ".lora_A." in name:
            # lora_B starts at zero, so dL/dA = B^T (...) is exactly zero on the first step
            assert torch.count_nonzero(p.grad) == 0, name
        else:
            assert torch.count_nonzero(p.grad) > 0, name

    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = model.state_dict()
    for key, value in before.items():
        if not is_trainable(key):
            assert torch.equal(after[key], value), f"frozen {key} changed"
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("generator."))
    assert any(not torch.equal(after[k], before[k]) for k in before if ".lora_B." in k)


def _box_and_encode(backbone) -> tuple[torch.Tensor, torch.Tensor]:
    images = make_targets(2)
    boxes = torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 5.0, 110.0, 90.0]])
    with torch.no_grad():
        x, _ = backbone.preprocess(images)
        return backbone.predict_box(images, boxes), backbone.encode(x).embed


def test_lora_is_a_no_op_at_init() -> None:
    torch.manual_seed(0)
    plain = build_sam_tiny()
    torch.manual_seed(0)
    adapted = build_sam_tiny()
    add_lora(adapted, rank=2, sites=("encoder", "decoder"))
    lora_b = [p for name, p in adapted.named_parameters() if ".lora_B." in name]
    assert any("image_encoder" in n for n, _ in adapted.named_parameters() if ".lora_" in n)
    assert any("mask_decoder" in n for n, _ in adapted.named_parameters() if ".lora_" in n)

    box_plain, embed_plain = _box_and_encode(plain)
    box_lora, embed_lora = _box_and_encode(adapted)
    assert box_plain.shape == (2, 1, H, W)
    torch.testing.assert_close(box_lora, box_plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(embed_lora, embed_plain, atol=1e-6, rtol=1e-6)

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in lora_b:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    box_lora, embed_lora = _box_and_encode(adapted)
    assert not torch.allclose(box_lora, box_plain, atol=1e-4)
    assert not torch.allclose(embed_lora, embed_plain, atol=1e-4)


# --- determinism and caching -----------------------------------------------------------------------------------------
def test_same_seed_same_output() -> None:
    images, masks = make_support(2, 2)
    targets = make_targets(2)
    outs = []
    for _ in range(2):
        model = tiny_model(seed=3)
        with torch.no_grad():
            outs.append(model.segment(targets, model.encode_support(images, masks)))
    assert torch.equal(outs[0], outs[1])


def test_cached_support_equals_uncached(model) -> None:
    images, masks = make_support(3, 2)
    targets = make_targets(3)
    with torch.no_grad():
        support = model.encode_support(images, masks)
        one_by_one = torch.cat([model.segment(targets[i : i + 1], support) for i in range(3)])
        batched = model.segment(targets, support)
        uncached = model(targets, images, masks)
    torch.testing.assert_close(one_by_one, uncached, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, uncached, atol=1e-5, rtol=1e-5)


def test_merged_lora_same_output_and_weights_restored(trained) -> None:
    model, _ = trained
    images, masks = make_support(2, 2)
    targets = make_targets(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        support = model.encode_support(images, masks)
        plain = model.segment(targets, support)
        with merged_lora(model):
            merged = model.segment(targets, support)
            changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith("base_layer.weight") for k in changed)  # merged into the base weights...
    torch.testing.assert_close(merged, plain, atol=1e-4, rtol=1e-4)  # ...computing the same
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # restored bit for bit
    with pytest.raises(RuntimeError, match="no_grad"), merged_lora(model):
        pass


def test_lora_disabled_inside_merged_lora_merges_again_on_exit(trained) -> None:
    """The self-box pass turns the adapters off inside `label_slices`' `merged_lora`: the slices after it still run
    merged, computing what they computed before it, and the weights are restored bit for bit at the end."""
    from peft.tuners.lora import LoraLayer

    model, _ = trained
    images, masks = make_support(2, 2)
    targets = make_targets(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        support = model.encode_support(images, masks)
        with merged_lora(model):
            first = model.segment(targets, support)
            with lora_disabled(model.backbone):
                model.segment(targets, support)  # peft unmerges a disabled layer when it runs
                assert not any(m.merged for m in model.backbone.modules() if isinstance(m, LoraLayer))
            assert all(m.merged for m in layers)
            torch.testing.assert_close(model.segment(targets, support), first, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_min_carried_skips_only_objects_carried_nowhere(trained) -> None:
    """Objects below the threshold get background without a decode; every other one is decoded as before."""
    model, _ = trained
    images, masks = make_support(2, 3)
    targets = make_targets(3)
    with torch.no_grad():
        support = model.encode_support(images, masks)
        features = model.encode_images(model.backbone.preprocess(targets)[0])
        _, coarse = model.generator(model.to_grid(features.embed), support)
        peak = coarse.flatten(2).amax(2)  # (B, N)
        tau = float(peak.flatten().sort().values[4])  # 4 of the 9 (target, object) pairs fall below it
        full, full_iou = model.segment_features(features, support, with_iou=True)
        part, part_iou = model.segment_features(features, support, with_iou=True, min_carried=tau)
    skipped = peak < tau
    assert int(skipped.sum()) == 4
    torch.testing.assert_close(part[~skipped], full[~skipped], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part_iou[~skipped], full_iou[~skipped], atol=1e-5, rtol=1e-5)
    assert bool((part[skipped] == -20).all()) and bool((part_iou[skipped] == 0).all())


def test_mask_box_is_the_tight_box_of_a_mask() -> None:
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 0] = masks[1, 9, 11] = True
    assert [mask_box(m).tolist() for m in masks] == [[3.0, 2.0, 9.0, 5.0], [0.0, 7.0, 12.0, 10.0]]
    assert mask_box(torch.zeros(4, 4)) is None


def test_box_refine_averages_a_box_prompted_pass_and_keeps_empty_objects(trained) -> None:
    """The second pass is the backbone prompted with the first pass's own box, exactly as the box baseline prompts
    it; an object left empty by the first pass is returned untouched."""
    model, _ = trained
    images, masks = make_support(2, 2)
    with torch.no_grad():
        support = model.encode_support(images, masks)
        features = model.encode_images(model.backbone.preprocess(make_targets(2))[0])
        first = model.segment_features(features, support)
        first[1, 1] = -5.0  # an object the first pass did not find
        refined = model.refine_with_box(features, first)
        assert torch.equal(refined[1, 1], first[1, 1])
        b, n = 0, 0
        found = first[b, n] > 0
        assert bool(found.any())
        box = mask_box(found)[None] * (model.backbone.img_size / first.shape[-1])
        corners, _ = model.backbone.prompt_encoder(points=None, boxes=box, masks=None)
        with lora_disabled(model):
            second = model.backbone.decode(features.select([b]), corners[:, None])[0, 0]
        torch.testing.assert_close(refined[b, n], (first[b, n] + second) / 2)
        with_lora = model.backbone.decode(features.select([b]), corners[:, None])[0, 0]
        assert not torch.allclose(second, with_lora)  # the trained adapters are really off for the box pass
        plain = model.segment_features(features, support)
        assert torch.equal(model.segment_features(features, support, box_refine=False), plain)
        torch.testing.assert_close(
            model.segment_features(features, support, box_refine=True), model.refine_with_box(features, plain)
        )


def test_label_slices_passes_box_refine_through(trained) -> None:
    """The volume and folder paths (`segment_image` -> `label_slices`) refine exactly as `segment` does."""
    from ppgseg.inference import DecodePolicy, segment_image, to_label

    model, _ = trained
    images, masks = make_support(2, 2)
    targets = make_targets(2)
    with torch.no_grad():
        support = model.encode_support(images, masks)
        expected = to_label(model.segment(targets, support, box_refine=True), [1, 2])
        plain = to_label(model.segment(targets, support), [1, 2])
    volume = targets.permute(1, 2, 3, 0).float()  # (C, H, W, Z): slices along axis 2
    got = segment_image(model, volume, support, [1, 2], axis=2, policy=DecodePolicy(box_refine=True)).permute(2, 0, 1)
    assert torch.equal(got, expected) and not torch.equal(got, plain)


def _encoded(model, n: int, targets: torch.Tensor) -> tuple:
    """A 2-pair support set of ``n`` objects, encoded, and the targets' backbone features."""
    images, masks = make_support(2, n)
    support = model.encode_support(images, masks)
    return support, model.encode_images(model.backbone.preprocess(targets)[0])


def _counting(model, monkeypatch) -> list[int]:
    """Count the (target, object) pairs the model decodes."""
    counts, decode = [], model.decode_kept

    def counted(features, tokens, coarse, keep):
        counts.append(int(keep.sum()))
        return decode(features, tokens, coarse, keep)

    monkeypatch.setattr(model, "decode_kept", counted)
    return counts


def test_sparse_slices_equal_every_slice_where_no_gap_agrees(trained, monkeypatch) -> None:
    """With nothing agreeing, bisection decodes every slice: the logits of decoding each slice, pair by pair."""
    from ppgseg.inference import DecodePolicy, sparse_slice_logits

    model, _ = trained
    with torch.no_grad():
        support, features = _encoded(model, 3, make_targets(7))
        dense = model.segment_features(features, support, min_carried=0.3)
        counts = _counting(model, monkeypatch)
        sparse = sparse_slice_logits(model, features, support, DecodePolicy(z_stride=3, min_carried=0.3, agree=1.01))
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    keep = model.select(features, support).carried(0.3)
    assert 0 < int(keep.sum()) < keep.numel()  # some pairs are not carried: background, undecoded
    assert sum(counts) == int(keep.sum())  # each carried pair decoded once, no other


def test_sparse_slices_decode_only_anchors_where_slices_agree(trained, monkeypatch) -> None:
    """Seven copies of one slice: the anchors (0, 3, 6) agree, so only they are decoded (and only their proxy prompts
    made by the CCM), and the slices between get the same logits as decoding them."""
    from ppgseg.inference import DecodePolicy, sparse_slice_logits

    model, _ = trained
    with torch.no_grad():
        support, features = _encoded(model, 2, make_targets(1).expand(7, -1, -1, -1))
        dense = model.segment_features(features, support)
        counts = _counting(model, monkeypatch)
        colorized, colorize = [], model.generator.colorize

        def counted(selected, pairs=None):
            colorized.append(selected.ctx.shape[:2].numel() if pairs is None else len(pairs[0]))
            return colorize(selected, pairs)

        monkeypatch.setattr(model.generator, "colorize", counted)
        sparse = sparse_slice_logits(model, features, support, DecodePolicy(z_stride=3))
    assert sum(counts) == sum(colorized) == 3 * 2
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)


def test_sparse_slices_interpolate_by_slice_position(trained) -> None:
    """Rows at slices 0, 3 and 4 of a volume (slices 1, 2 left out): the middle row lies 3/4 of the way."""
    from ppgseg.inference import DecodePolicy, sparse_slice_logits

    model, _ = trained
    with torch.no_grad():
        support, features = _encoded(model, 2, make_targets(3))
        dense = model.segment_features(features, support)
        sparse = sparse_slice_logits(model, features, support, DecodePolicy(z_stride=2, agree=0.0), positions=[0, 3, 4])
    torch.testing.assert_close(sparse[[0, 2]], dense[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse[1], 0.25 * dense[0] + 0.75 * dense[2], atol=1e-5, rtol=1e-5)


def test_segment_image_z_stride_needs_features(model) -> None:
    from ppgseg.inference import DecodePolicy, segment_image

    images, masks = make_support(2, 2)
    with torch.no_grad():
        support = model.encode_support(images, masks)
    volume = make_targets(3).permute(1, 2, 3, 0).float()
    with pytest.raises(ValueError, match="z_stride > 1 needs"):
        segment_image(model, volume, support, [1, 2], policy=DecodePolicy(z_stride=2))


# --- checkpoints -----------------------------------------------------------------------------------------------------
def _output(model) -> torch.Tensor:
    images, masks = make_support(2, 2)
    with torch.no_grad():
        return model(make_targets(2), images, masks)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[torch.nn.Module, object]:
    """A seed-0 model whose PPG and LoRA weights (lora_B included) moved away from their initial values, saved."""
    model = tiny_model(seed=0)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.2 if ".lora_B." in name else 0.05))
    path = save_ppg(model, tmp_path_factory.mktemp("ckpt") / "ppg.pt")
    return model, path


def test_checkpoint_holds_only_ppg_and_lora(trained) -> None:
    model, path = trained
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys == {k for k in model.state_dict() if k.startswith("generator.") or ".lora_" in k}
    assert any(k.startswith("generator.") for k in keys) and any(".lora_B." in k for k in keys)
    assert ckpt["config"]["backbone"] == "sam_tiny"


def test_checkpoint_round_trip(trained) -> None:
    model, path = trained
    expected = _output(model)

    # another seed: other PPG + LoRA, and another random backbone, which a PPG checkpoint does not hold by design;
    # give it the same frozen backbone weights so only what the checkpoint carries differs
    fresh = tiny_model(seed=1)
    frozen = {k: v for k, v in model.state_dict().items() if not is_trainable(k)}
    result = fresh.load_state_dict(frozen, strict=False)
    assert not result.unexpected_keys and all(is_trainable(k) for k in result.missing_keys)
    assert not torch.allclose(_output(fresh), expected, atol=1e-4)
    load_ppg(fresh, path)
    assert torch.equal(_output(fresh), expected)

    # build_model(ppg_checkpoint=...) with the seed that gives the same random backbone
    assert not torch.allclose(_output(tiny_model(seed=0)), expected, atol=1e-4)
    torch.manual_seed(0)
    loaded = build_model("sam_tiny", "tiny", pretrained=False, ppg_checkpoint=path)
    assert not loaded.training
    assert torch.equal(_output(loaded), expected)


def test_checkpoint_for_another_backbone_is_refused(trained, sam2_model) -> None:
    _, path = trained
    with pytest.raises(ValueError, match=r"'sam_tiny'.*'sam2'"):
        load_ppg(sam2_model, path)


def test_checkpoint_with_missing_key_is_refused(trained, tmp_path) -> None:
    _, path = trained
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    dropped = sorted(ckpt["state_dict"])[0]
    del ckpt["state_dict"][dropped]
    broken = tmp_path / "broken.pt"
    torch.save(ckpt, broken)
    with pytest.raises(ValueError, match="missing"):
        load_ppg(tiny_model(), broken)


def test_checkpoint_with_other_settings_is_refused(trained) -> None:
    _, path = trained
    with pytest.raises(ValueError, match="other settings"):
        load_ppg(tiny_model(selector="mean"), path)


def test_missing_checkpoint_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_ppg(tiny_model(), tmp_path / "nope.pt")


def test_half_precision_checkpoint_loads(trained, tmp_path) -> None:
    model, _ = trained
    path = save_ppg(model, tmp_path / "half.pt", half=True)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in ckpt["state_dict"].values() if v.is_floating_point())
    fresh = tiny_model(seed=0)
    load_ppg(fresh, path)
    params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert params[name].dtype == torch.float32
            torch.testing.assert_close(params[name], p.detach().half().float(), atol=0, rtol=0)
    torch.testing.assert_close(_output(fresh), _output(model), atol=5e-2, rtol=5e-2)


# --- input checks ----------------------------------------------------------------------------------------------------
def _bad_support(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = make_support(2, 2)
    if case == "size":
        return images, masks[..., :-8]
    if case == "empty":
        return images[:0], masks[:0]
    if case == "count":
        return images, masks[:1]
    if case == "binary":
        return images, masks * 0.5
    if case == "channels":
        return images[:, :2], masks
    if case == "mask-3d":
        return images, masks[:, 0]
    if case == "empty-object":
        masks[:, 1] = 0
        return images, masks
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case,message",
    [
        ("size", r"does not match image"),
        ("empty", r"empty \(K = 0\)"),
        ("count", r"1 support masks for 2 support images"),
        ("binary", r"binary"),
        ("channels", r"\(K, 1 or 3, H, W\)"),
        ("mask-3d", r"support masks must be \(K, N, H, W\)"),
        ("empty-object", r"object\(s\) \[1\] are empty in every support pair"),
    ],
)
def test_bad_support_raises(model, case: str, message: str) -> None:
    images, masks = _bad_support(case)
    with pytest.raises(ValueError, match=message):
        model.encode_support(images, masks)


def test_bad_targets_raise(model) -> None:
    images, masks = make_support(1, 1)
    with torch.no_grad():
        support = model.encode_support(images, masks)
    with pytest.raises(ValueError, match=r"1 or 3"):
        model.segment(make_targets(1)[:, :2], support)
    with pytest.raises(ValueError, match=r"empty"):
        model.segment(make_targets(1)[:0], support)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"backbone": "sam_vit_z"}, r"backbone must be one of"),
        ({"preset": "huge"}, r"preset must be one of"),
        ({"selector": "max"}, r"selector"),
        ({"colorizer": "none"}, r"colorizer"),
    ],
)
def test_build_model_bad_names(kwargs: dict, message: str) -> None:
    args = {"backbone": "sam_tiny", "preset": "tiny", "pretrained": False} | kwargs
    with pytest.raises(ValueError, match=message):
        build_model(**args)


@pytest.mark.parametrize("checkpoint", [None, "/nonexistent/sam_vit_b.pth"])
def test_sam_vit_b_needs_its_checkpoint(checkpoint) -> None:
    with pytest.raises(FileNotFoundError, match=r"sam_vit_b_01ec64\.pth"):
        build_model("sam_vit_b", "tiny", checkpoint=checkpoint)


# --- ablations and other backbones -----------------------------------------------------------------------------------
def test_default_modules(model) -> None:
    assert isinstance(model.generator.selector, SelectiveMap)
    assert isinstance(model.generator.colorizer, ContextualColorization)


@pytest.mark.parametrize(
    "override,attr,kind",
    [({"selector": "mean"}, "selector", MeanContext), ({"colorizer": "pooled"}, "colorizer", PooledContext)],
)
def test_ablations(override: dict, attr: str, kind: type) -> None:
    model = tiny_model(**override)
    assert isinstance(getattr(model.generator, attr), kind)
    assert model.config[attr] == next(iter(override.values()))
    images, masks = make_support(2, 3)
    with torch.no_grad():
        logits = model.segment(make_targets(2), model.encode_support(images, masks))
    assert logits.shape == (2, 3, H, W)
    assert torch.isfinite(logits).all()


def test_sam2_backbone_through_ppg(sam2_model) -> None:
    assert sam2_model.backbone.img_size == 256 and sam2_model.generator.grid == sam2_model.backbone.feat_size
    lora = [n for n, _ in sam2_model.named_parameters() if ".lora_" in n]
    assert any(n.startswith("backbone.model.image_encoder.trunk.") for n in lora)
    assert any(n.startswith("backbone.model.sam_mask_decoder.") for n in lora)
    images, masks = make_support(1, 2)
    with torch.no_grad():
        logits = sam2_model(make_targets(1), images, masks)
    assert logits.shape == (1, 2, H, W)
    assert torch.isfinite(logits).all()


def test_batched_encoding_equals_one_at_a_time(model) -> None:
    """CUDA encodes a batch in one call, CPU one image at a time: both give the same features."""
    x, _ = model.backbone.preprocess(make_targets(3))
    with torch.no_grad():
        batched = model.backbone.encode(x).embed  # the CUDA path, forced on CPU
        single = model.encode_images(x).embed  # the CPU path
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
