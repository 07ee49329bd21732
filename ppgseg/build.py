"""The one place where backbones, presets and their hyper-parameters live."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .backbones import Backbone, build_litemedsam, build_sam, build_sam2_backbone, build_sam_tiny
from .checkpoint import load_ppg, saved_config
from .lora import add_lora, freeze_base
from .modeling.bridge import BridgeUnit
from .modeling.colorization import ContextualColorization, PooledContext
from .modeling.generator import MaskContext, ProxyPromptGenerator
from .modeling.memory_prompt import MemoryPrompt
from .modeling.prompt_route import P_ONLY_ROUTES, ROUTES, build_route
from .modeling.proxy_sam import ProxyPromptSAM
from .modeling.proxy_sam2_video import ProxyPromptVideo
from .modeling.selective_map import MeanContext, SelectiveMap
from .modeling.selective_scan import scan_backend
from .modeling.vision_mamba import VisionMambaEncoder


@dataclass(frozen=True)
class Preset:
    """PPG and LoRA settings.

    grid: side of the token grid the PPG works on; None = the backbone's feature grid (64 for SAM / LiteMedSAM).
    vim_coarsen: Vim patch = input / (grid / vim_coarsen); > 1 scans fewer tokens and upsamples V to the grid.
    selector: "selective" (Eq. 6-7) or "mean" (ablation: without CSM selection).
    colorizer: "ccm" (Eq. 8-11) or "pooled" (ablation: without CCM).
    lora_sites: where LoRA goes, among ("encoder", "decoder").
    prompt: how the PPG's output enters the decoder, one of `ROUTES` ("paper": P alone as Eq. 12; "transfer": P
        plus the support masks carried over by the Selective map; see ``modeling/prompt_route.py``). Routes where P
        alone reaches the decoder keep P on at least `MIN_P_SIDE` x `MIN_P_SIDE` tokens: `build_model` lowers
        ``ccm_depth`` (each block halves the tokens) until they do, and records the depth it used.
    """

    grid: int | None = None
    vim_dim: int = 192
    vim_depth: int = 24
    vim_coarsen: int = 1
    ccm_depth: int = 4
    ccm_heads: int = 8
    ccm_ffn: int = 1024
    selector: str = "selective"
    colorizer: str = "ccm"
    lora_rank: int = 4
    lora_sites: tuple[str, ...] = ("encoder", "decoder")
    prompt: str = "transfer"


# P alone must localise the object: on a generated two-object task (LiteMedSAM, 150 episodes) P on 4x4 tokens (the
# cpu preset's 16x16 grid after 4 CCM blocks) learned only "every salient object" (Dice 0.59 / 0.65, the same mask
# whichever object was asked); on 8x8 tokens, with the carried masks in E_ctx, it followed the support (0.96 / 0.93)
MIN_P_SIDE = 8

PRESETS: dict[str, Preset] = {
    # The paper: Vim-Tiny (depth 24, C_v = 192, patch onto the full feature grid), LoRA on encoder and decoder. GPU.
    "paper": Preset(),
    # CPU: the PPG on a 16x16 grid; a 4-block Vim scanning an 8x8 patch grid (the scan's backward dominated a CPU
    # step: 4 s -> 0.8 s); narrower CCM feed-forwards (9.2M parameters, 18 MB in half precision). The encoder stays
    # frozen so its features can be cached.
    "cpu": Preset(grid=16, vim_depth=4, vim_coarsen=2, ccm_ffn=256, lora_sites=("decoder",)),
    # Toy sizes for tests, on the tiny backbones.
    "tiny": Preset(vim_dim=16, vim_depth=1, ccm_heads=2, ccm_ffn=32, lora_rank=2, lora_sites=("encoder", "decoder")),
}

logger = logging.getLogger(__name__)

BACKBONES: dict[str, Callable[..., Backbone]] = {
    "litemedsam": lambda checkpoint, pretrained, **kw: build_litemedsam(checkpoint, pretrained),
    "sam_vit_b": lambda checkpoint, pretrained, **kw: build_sam("vit_b", checkpoint, pretrained),
    "sam_vit_l": lambda checkpoint, pretrained, **kw: build_sam("vit_l", checkpoint, pretrained),
    "sam_vit_h": lambda checkpoint, pretrained, **kw: build_sam("vit_h", checkpoint, pretrained),
    "sam2": lambda checkpoint, pretrained, **kw: build_sam2_backbone(checkpoint, pretrained=pretrained, **kw),
    "sam_tiny": lambda checkpoint, pretrained, **kw: build_sam_tiny(**kw),
}


def p_only_depth(preset: Preset, feat_size: int) -> int:
    """The CCM depth (even, at most the preset's) that leaves P at least `MIN_P_SIDE` tokens a side: each pair of
    blocks halves both sides of the PPG grid."""
    grid, depth = preset.grid or feat_size, preset.ccm_depth - preset.ccm_depth % 2
    while depth > 0 and grid // 2 ** (depth // 2) < MIN_P_SIDE:
        depth -= 2
    return depth


def build_generator(preset: Preset, backbone: Backbone) -> ProxyPromptGenerator:
    grid = preset.grid or backbone.feat_size
    if grid > backbone.feat_size or backbone.feat_size % grid:
        raise ValueError(f"PPG grid {grid} must divide the backbone's feature grid {backbone.feat_size}")
    if preset.selector not in ("selective", "mean"):
        raise ValueError(f"selector must be 'selective' or 'mean', got {preset.selector!r}")
    if preset.prompt not in ROUTES:
        raise ValueError(f"prompt must be one of {sorted(ROUTES)}, got {preset.prompt!r}")
    if preset.colorizer not in ("ccm", "pooled"):
        raise ValueError(f"colorizer must be 'ccm' or 'pooled', got {preset.colorizer!r}")
    c = backbone.embed_dim
    return ProxyPromptGenerator(
        context_encoder=VisionMambaEncoder(
            img_size=backbone.img_size,
            grid=grid,
            patch=backbone.img_size * preset.vim_coarsen // grid,
            dim=preset.vim_dim,
            depth=preset.vim_depth,
        ),
        bridge=BridgeUnit(c, preset.vim_dim),
        selector=SelectiveMap() if preset.selector == "selective" else MeanContext(),
        colorizer=(
            ContextualColorization(c, depth=preset.ccm_depth, heads=preset.ccm_heads, ffn_dim=preset.ccm_ffn)
            if preset.colorizer == "ccm"
            else PooledContext()
        ),
        grid=grid,
        mask_context=MaskContext(c) if preset.prompt in P_ONLY_ROUTES else None,
    )


def build_backbone(
    backbone: str = "litemedsam",
    checkpoint: str | Path | None = None,
    *,
    pretrained: bool = True,
    backbone_kwargs: dict | None = None,
) -> Backbone:
    """One of `BACKBONES`, without LoRA (see `build_model` for the arguments)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
    return BACKBONES[backbone](checkpoint, pretrained, **(backbone_kwargs or {}))


def build_model(
    backbone: str = "litemedsam",
    preset: str = "cpu",
    checkpoint: str | Path | None = None,
    ppg_checkpoint: str | Path | None = None,
    *,
    pretrained: bool = True,
    backbone_kwargs: dict | None = None,
    video: bool = False,
    require_scan_kernel: bool = False,
    **overrides,
) -> ProxyPromptSAM:
    """Build a ProxyPromptSAM.

    Args:
        backbone: one of `BACKBONES` ("litemedsam" is the default and ships its weights).
        preset: one of `PRESETS`; ``overrides`` replace single fields (e.g. ``selector="mean"`` for an ablation,
            ``prompt="paper"`` for P alone). Without a ``prompt`` override the route is the one ``ppg_checkpoint``
            was trained with (the preset's where there is none).
        checkpoint: the backbone's pretrained weights (SAM / SAM 2; LiteMedSAM's come with its package).
        ppg_checkpoint: trained PPG + LoRA weights from `save_ppg`.
        pretrained: False builds the backbone with random weights (tests).
        backbone_kwargs: passed to the backbone builder (e.g. sam2 ``image_size`` or ``config``).
        video: SAM 2 in video mode (`ProxyPromptVideo`: P in memory attention); needs the sam2 backbone.
        require_scan_kernel: fail unless mamba-ssm's fused selective-scan kernel will run (a GPU run at the `paper`
            preset would otherwise fall back to the pure-PyTorch scan, which holds gigabytes more). Which scan runs,
            and why, is logged at every build either way.
    """
    scan, why = scan_backend()
    logger.info(f"Vision Mamba selective scan on GPU tensors: {scan} ({why}); CPU tensors use the pure-PyTorch scan")
    if require_scan_kernel and scan != "mamba-ssm kernel":
        raise RuntimeError(
            f"require_scan_kernel is set but the mamba-ssm kernel cannot run: {why}. Install the CUDA extra "
            f"(pip install -e '.[cuda]') on a CUDA machine, or unset require_scan_kernel to use the pure-PyTorch scan"
        )
    if video and backbone != "sam2":
        raise ValueError(f"video mode needs backbone='sam2', got {backbone!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    prompt = overrides.pop("prompt", None)
    if prompt is None:
        saved = saved_config(ppg_checkpoint) if ppg_checkpoint is not None else {}
        prompt = saved.get("prompt", PRESETS[preset].prompt)
    settings = replace(PRESETS[preset], prompt=prompt, **overrides)
    net = build_backbone(backbone, checkpoint, pretrained=pretrained, backbone_kwargs=backbone_kwargs)
    if prompt in P_ONLY_ROUTES:
        settings = replace(settings, ccm_depth=p_only_depth(settings, net.feat_size))
    add_lora(net, rank=settings.lora_rank, sites=settings.lora_sites)
    config = {"backbone": backbone, "preset": preset, **asdict(settings), "lora_sites": list(settings.lora_sites)}
    generator = build_generator(settings, net)
    route = build_route(settings.prompt)
    if video:
        memory_prompt = MemoryPrompt(net.embed_dim, net.model.mem_dim)
        config["video"] = True
        model = ProxyPromptVideo(
            backbone=net, generator=generator, memory_prompt=memory_prompt, route=route, config=config
        )
    else:
        model = ProxyPromptSAM(backbone=net, generator=generator, route=route, config=config)
    freeze_base(model)
    if ppg_checkpoint is not None:
        load_ppg(model, ppg_checkpoint)
    return model.eval()
