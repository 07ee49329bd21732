"""LoRA adapters (peft) on the backbone's attention, and the one function that decides what trains."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .backbones.base import Backbone

LORA_SITES = ("encoder", "decoder")


def add_lora(backbone: Backbone, *, rank: int, sites: tuple[str, ...]) -> None:
    """Inject peft LoRA layers into the attention projections of the image encoder and/or mask decoder.

    peft initialises LoRA's B to zero, so the adapted backbone computes exactly what the original does until trained.
    """
    from peft import LoraConfig, inject_adapter_in_model

    unknown = set(sites) - set(LORA_SITES)
    if unknown:
        raise ValueError(f"lora sites must be among {LORA_SITES}, got {sorted(unknown)}")
    if not sites:
        return
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    patterns = {"encoder": backbone.encoder_lora_targets, "decoder": backbone.decoder_lora_targets}
    target = "|".join(f"(?:{patterns[s]})" for s in sites)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=target), backbone)


def is_trainable(name: str) -> bool:
    """PPG (with its projection into SAM 2's memory, video mode) and LoRA parameters train; every original backbone
    weight stays frozen."""
    return name.startswith(("generator.", "memory_prompt.")) or ".lora_" in name


def freeze_base(model: nn.Module) -> list[str]:
    """Set requires_grad on exactly the trainable parameters; returns their names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name))
        if p.requires_grad:
            names.append(name)
    return names


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[None]:
    """Inference with every LoRA adapter merged into its base weight (peft's ``merge``): one matrix product per
    adapted projection instead of three. On exit the adapters are unmerged and the base weights restored bit for bit
    from a copy (unmerging alone leaves rounding drift), so training and checkpoints never see merged weights.
    Gradients must be off: a merged layer no longer passes any to its adapter."""
    from peft.tuners.lora import LoraLayer

    if torch.is_grad_enabled():
        raise RuntimeError("merged_lora is for inference: call it under torch.no_grad()")
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and not m.merged]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    try:
        for m in layers:
            m.merge()
        yield
    finally:
        for m, weight in zip(layers, saved, strict=True):
            if m.merged:
                m.unmerge()
            m.get_base_layer().weight.copy_(weight)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """The backbone as it shipped: every LoRA adapter off (peft's ``enable_adapters(False)``; peft unmerges a
    merged one when it next runs), each restored to its state on exit, merged again where it was (inside `merged_lora`,
    which restores the base weights bit for bit at its own exit)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    states = [(not m.disable_adapters, m.merged) for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, (on, merged) in zip(layers, states, strict=True):
            m.enable_adapters(on)
            if merged and not m.merged:
                m.merge()
