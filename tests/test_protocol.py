"""The protocol report on a tiny run produces every section, for PPG and every peer method."""

from __future__ import annotations

import json

import numpy as np

from ppgseg.data.generated.families import write_family
from ppgseg.evaluation.baselines import METHODS
from ppgseg.evaluation.protocol import ROUTE_ABLATIONS, Protocol, Settings
from ppgseg.evaluation.report import write_report


def test_tiny_protocol_writes_every_section(tmp_path):
    data = write_family(tmp_path, "ultrasound", n_train=4, n_val=0, n_test=2, seed=2)
    s = Settings(
        dataset=data, out=tmp_path / "report", backbone="sam_tiny", preset="tiny", steps=2, train_support=2,
        test_support=2, views=2, draws=2, train_sizes=(2, 4), support_sizes=(1, 2, 4), finetune_steps=2, overlays=2,
        optimizer="adamw", lr=1e-3,
    )  # fmt: skip
    p = Protocol(s)
    result = p.run()
    res = result.results
    text = write_report(result).read_text()
    assert "trains 2 episodes (AdamW, lr 0.001, Dice loss)" in text
    for heading in ("## Table 1", "### Latency", "## Table 2", "## Prompt routes", "## Fig. 7", "## Fig. 4"):
        assert heading in text
    methods = res["methods"]
    assert list(methods) == list(METHODS)
    for m in methods.values():
        assert m["name"] in text and len(m["dice"]) == 2 and m["seconds"] > 0
        assert len(m["draws"]) == 2 and all(len(d) == 2 for d in m["draws"])
        assert len(m["per_target"]) == 2 and np.allclose(
            np.nanmean(m["per_target"], axis=0), m["dice"], equal_nan=True
        )  # 2 targets
    assert methods["ppg"]["models_trained"] == 1 and methods["finetune"]["models_trained"] == 2
    assert methods["box"]["models_trained"] == 0 and methods["persam"]["models_trained"] == 0
    assert list(res["routes"]) == list(ROUTE_ABLATIONS) and all(len(d) == 2 for d in res["routes"].values())
    assert len(res["table2"]) == 4 and set(res["fig7"]) == {"2,1", "2,2", "4,1", "4,2", "4,4"}
    for figure in ("table1_methods.png", "methods_overlays.png", "fig4_stability.png", "fig7_support_sizes.png"):
        assert (s.out / figure).stat().st_size > 0 and f"]({figure})" in text
    assert json.loads((s.out / "results.json").read_text())["methods"]["box"]["dice"] == methods["box"]["dice"]


def test_methods_are_checked(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="methods must be among"):
        Settings(dataset=tmp_path, out=tmp_path, methods=("ppg", "clicks"))
    with pytest.raises(ValueError, match="loss must be one of"):
        Settings(dataset=tmp_path, out=tmp_path, loss="l2")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Settings(dataset=tmp_path, out=tmp_path, optimizer="adam")


def test_optimizers_are_the_paper_sgd_and_adamw():
    import pytest
    import torch

    from ppgseg.training import make_optimizer

    net = torch.nn.Linear(2, 2)
    sgd, adamw = make_optimizer(net), make_optimizer(net, lr=3e-3, kind="adamw")
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 0.01 and sgd.defaults["momentum"] == 0.9
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["lr"] == 3e-3
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer(net, kind="adam")


def test_zero_training_evaluates_the_start_weights_as_they_are(tmp_path):
    """--steps 0 with --ppg-checkpoint: the PPG is the checkpoint's, untouched, and the report says so."""
    import torch

    from ppgseg import build_model, save_ppg

    data = write_family(tmp_path, "ultrasound", n_train=4, n_val=0, n_test=2, seed=2)
    torch.manual_seed(5)
    start = build_model("sam_tiny", "tiny", pretrained=False)
    with torch.no_grad():
        for p in start.generator.parameters():
            p.add_(0.01)  # not what any seed builds
    path = save_ppg(start, tmp_path / "start.pt")
    s = Settings(
        dataset=data, out=tmp_path / "report", backbone="sam_tiny", preset="tiny", ppg_checkpoint=str(path), steps=0,
        test_support=2, draws=2, studies=("table1", "fig7", "objects"), methods=("ppg", "box"), train_sizes=(4,),
        support_sizes=(1, 2, 4), overlays=1,
    )  # fmt: skip
    p = Protocol(s)
    main = p.train(p.model(), 4)
    for (name, a), b in zip(main.generator.state_dict().items(), start.generator.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    result = p.run()
    res = result.results
    assert set(res["fig7"]) == {"4,1", "4,2", "4,4"}
    assert set(res["objects"]) == {"1", "2"} and all(len(v) == 2 for v in res["objects"].values())
    text = write_report(result).read_text()
    assert "No training" in text and "## Objects asked at once" in text and (s.out / "objects_asked.png").is_file()
