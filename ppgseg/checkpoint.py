"""Saving and loading what trains (PPG + LoRA), strictly."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .lora import is_trainable

FORMAT = "ppgseg-ppg/1"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if is_trainable(k)}


@contextlib.contextmanager
def weights_loaded(model: nn.Module, state: dict[str, torch.Tensor] | None):
    """``state`` (trainable weights) loaded into ``model`` for the ``with`` block, its own weights back after; None
    changes nothing."""
    if state is None:
        yield model
        return
    own = {k: v.clone() for k, v in trainable_state(model).items()}
    model.load_state_dict(state, strict=False)
    try:
        yield model
    finally:
        model.load_state_dict(own, strict=False)


def save_ppg(model: nn.Module, path: str | Path, *, half: bool = False, seed: int | None = None) -> Path:
    """Write only the PPG + LoRA weights, with the backbone and settings they were trained for (and the training
    run's ``seed``, when given)."""
    state = trainable_state(model)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "config": model.config, "state_dict": state, "seed": seed}, path)
    return path


def saved_config(path: str | Path) -> dict:
    """The settings a `save_ppg` file was trained with (its backbone, preset fields and prompt route)."""
    return _read(Path(path))["config"]


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"PPG checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ppgseg PPG checkpoint (expected format {FORMAT!r})")
    return ckpt


def load_ppg(model: nn.Module, path: str | Path) -> None:
    """Load a `save_ppg` file into ``model``; refuse one made for another backbone or settings, or with any
    missing, unexpected or mis-shaped key."""
    path = Path(path)
    ckpt = _read(path)
    saved, ours = ckpt["config"], model.config
    if saved.get("backbone") != ours.get("backbone"):
        raise ValueError(
            f"{path} was trained for backbone {saved.get('backbone')!r}, but this model's backbone is "
            f"{ours.get('backbone')!r}: build the model with backbone={saved.get('backbone')!r} or use a checkpoint "
            f"trained for {ours.get('backbone')!r}"
        )
    differ = {k: (saved.get(k), ours.get(k)) for k in ours if k != "preset" and saved.get(k) != ours.get(k)}
    if differ:
        raise ValueError(f"{path} was trained with other settings (saved, this model): {differ}")
    expected = trainable_state(model)
    state = ckpt["state_dict"]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    shapes = [k for k in expected if expected[k].shape != state[k].shape]
    if shapes:
        raise ValueError(f"{path} has mis-shaped weights: {shapes[:5]}")
    model.load_state_dict(state, strict=False)
