"""Decoder-only fine-tune without prompts (Table 1's SAMed row): peft LoRA on the mask decoder's attention, trained
on the training pairs with MONAI's Dice + cross-entropy loss, one model per object; at test time the decoder runs
with no prompt at all, so the support set plays no part."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import Tensor
from tqdm import tqdm

from ...backbones.base import Backbone
from ...lora import add_lora
from .base import Method, Pairs, Target


class DecoderFineTune(Method):
    """One LoRA adapter of the mask decoder per object, prompt-free.

    Args:
        backbone: the frozen backbone; it is not modified (the adapters live in a copy of its modules that shares
            its weights).
        steps: optimiser steps per object.
        batch: training images per step.
        rank: LoRA rank.
        lr: AdamW learning rate.
    """

    name = "Decoder fine-tune (LoRA, no prompt)"
    needs = "nothing (a model per object)"
    uses_support = False

    def __init__(self, backbone: Backbone, *, steps: int = 150, batch: int = 4, rank: int = 8, lr: float = 3e-3):
        super().__init__(backbone)
        if steps < 1 or batch < 1:
            raise ValueError(f"steps and batch must be >= 1, got {steps} and {batch}")
        # modules of its own (LoRA goes into the copy), every frozen base weight shared with ``backbone``
        self.tuned = copy.deepcopy(backbone, memo={id(p): p for p in backbone.parameters()})
        add_lora(self.tuned, rank=rank, sites=("decoder",))
        self.lora = [p for n, p in self.tuned.named_parameters() if ".lora_" in n]
        for n, p in self.tuned.named_parameters():
            p.requires_grad_(".lora_" in n)
        self.steps, self.batch, self.lr = steps, batch, lr
        self.adapters: list[list[Tensor]] = []
        self.loss_history: list[list[float]] = []

    def models_trained(self, num_objects: int) -> int:
        return num_objects

    def _no_prompt(self, b: int) -> Tensor:
        return torch.zeros(b, 1, 0, self.tuned.embed_dim, device=self.tuned.device)  # (B, N=1, T=0, C)

    def fit(self, train: Pairs, seed: int = 0) -> None:
        loss_fn = DiceCELoss(sigmoid=True)
        initial = [p.detach().clone() for p in self.lora]
        self.adapters, self.loss_history = [], []
        for n in range(train.masks.shape[1]):
            with torch.no_grad():
                for p, p0 in zip(self.lora, initial, strict=True):
                    p.copy_(p0)
            rng = np.random.default_rng([seed, n])
            opt = torch.optim.AdamW(self.lora, lr=self.lr)
            losses = []
            self.tuned.train()
            for _ in tqdm(range(self.steps), desc=f"decoder fine-tune, object {n + 1}", leave=False):
                idx = [int(i) for i in rng.choice(len(train), min(self.batch, len(train)), replace=False)]
                logits = self.tuned.decode(train.features.select(idx), self._no_prompt(len(idx)))  # (B, 1, h, w)
                truth = F.interpolate(train.masks[idx][:, n : n + 1], size=logits.shape[-2:], mode="area") > 0.5
                loss = loss_fn(logits, truth.float())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            self.tuned.eval()
            self.adapters.append([p.detach().clone() for p in self.lora])
            self.loss_history.append(losses)

    @torch.no_grad()
    def predict(self, target: Target, seed: int = 0) -> Tensor:
        if len(self.adapters) != target.truth.shape[1]:
            raise RuntimeError(
                f"fit() trained {len(self.adapters)} object models, the target has {target.truth.shape[1]} objects"
            )
        low = []
        for adapter in self.adapters:
            for p, v in zip(self.lora, adapter, strict=True):
                p.copy_(v)
            low.append(self.tuned.decode(target.features, self._no_prompt(1))[0, 0])
        return self.to_original(torch.stack(low), target)
