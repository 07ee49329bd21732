"""The trainer's iteration for episodes (MONAI's `SupervisedTrainer` with this as ``iteration_update``)."""

from __future__ import annotations

from ignite.engine import Engine


def episode_step(engine: Engine, episode: dict) -> dict:
    """The trainer's iteration (``iteration_update`` of MONAI's SupervisedTrainer): one episode, one SGD step."""
    engine.network.train()
    logits, truth = engine.network(episode)
    loss = engine.loss_function(logits, truth)
    engine.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    engine.optimizer.step()
    return {"pred": logits.detach(), "label": truth, "loss": loss.detach()}
