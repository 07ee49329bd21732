"""The MONAI bundle driven as a user runs it (tiny random backbone, generated data), and its bad-input handling."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from ppgseg import build_model, save_ppg
from ppgseg.data.generated.families import write_family
from ppgseg.data.splits import select_objects
from ppgseg.inference import FolderSegmenter, SupportSet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
TINY = ["--backbone", "sam_tiny", "--preset", "tiny"]


def bundle_run(
    *args: str, run_id: str | None = None, torchrun: int = 0, ok: bool = True
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` (under torchrun with ``torchrun`` processes); it must succeed, or with
    ``ok=False`` fail."""
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", f"--master_port={port}"]
    else:
        head = [sys.executable]
    cmd = [*head, "-m", "monai.bundle", "run", *([run_id] if run_id else []), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle_demo")
    return {f: write_family(root, f, n_train=3, n_val=1, n_test=2, seed=3) for f in ("fundus", "ct")}


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """One short training run through the CLI's `training` run key."""
    out = tmp_path_factory.mktemp("train")
    bundle_run(
        "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(demo["fundus"]), "--output_dir", str(out),
        "--episodes_per_epoch", "3", "--train#trainer#max_epochs", "1", *TINY, run_id="training",
    )  # fmt: skip
    return out


def test_metadata_has_the_bundle_fields_and_describes_the_network():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    required = [
        "schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
        "required_packages_version", "name", "task", "description", "authors",
        "copyright", "data_source", "data_type", "image_classes", "label_classes", "pred_classes", "eval_metrics",
        "intended_use", "references", "network_data_format",
    ]  # fmt: skip
    assert not [k for k in required if k not in meta]
    assert meta["version"] in meta["changelog"]
    # MONAI replaces the required list by an optional one when both exist, and the zoo installs every optional one
    assert "optional_packages_version" not in meta
    import monai

    assert meta["monai_version"] == monai.__version__
    model = build_model("litemedsam", "cpu")  # the bundle's default network
    fmt = meta["network_data_format"]
    side = model.backbone.img_size
    for key in ("image", "support_images", "support_masks"):
        assert fmt["inputs"][key]["spatial_shape"] == [side, side]
    assert fmt["inputs"]["image"]["num_channels"] == 3 and fmt["outputs"]["pred"]["spatial_shape"] == [side, side]
    support = torch.zeros(1, 3, side, side)
    masks = torch.zeros(1, 2, side, side)
    masks[:, :, 100:150, 100:150] = 1
    with torch.no_grad():
        pred = model(torch.zeros(1, 3, side, side), support, masks)
    assert pred.shape == (1, 2, side, side)  # N output channels, one per support mask channel


def test_training_writes_only_ppg_and_lora_weights(trained):
    names = sorted(p.name for p in trained.iterdir())
    assert "model.pt" in names and "model_final.pt" in names and "tensorboard" in names
    state = torch.load(trained / "model_final.pt", weights_only=True)["state_dict"]
    assert state and all(k.startswith("generator.") or ".lora_" in k for k in state)


def test_default_run_key_trains_too(demo, tmp_path):
    """Also with the other optimiser, AdamW, chosen by config id."""
    bundle_run(
        "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(demo["fundus"]), "--output_dir",
        str(tmp_path), "--episodes_per_epoch", "2", "--train#trainer#max_epochs", "1", "--val_interval", "5", *TINY,
        "--optimizer_kind", "adamw", "--learning_rate", "0.003",
    )  # fmt: skip
    assert (tmp_path / "model_final.pt").is_file() and not (tmp_path / "model.pt").exists()  # no validation ran
    bad = bundle_run(
        "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(demo["fundus"]), "--output_dir",
        str(tmp_path / "bad"), "--optimizer_kind", "adam", *TINY, ok=False,
    )  # fmt: skip
    assert "optimizer must be one of ('sgd', 'adamw'), got 'adam'" in bad.stderr


def test_evaluate_writes_metrics_and_overlays(demo, tmp_path):
    """evaluate.json as shipped (LiteMedSAM, the bundle's default weights, K = 4) on generated fundus-like test images:
    measured with the 0.4 weights disc rim 0.769, cup 0.783 (vessels 0.247, one down-scaled pass; the 0.3 weights
    0.721, 0.826, 0.080); an untrained PPG gives 0.115, 0.024."""
    bundle_run(
        "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']", "--dataset_dir",
        str(demo["fundus"]), "--output_dir", str(tmp_path),
    )  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["dice"]) == {"optic_disc", "optic_cup", "vessel"} and metrics["targets"] == 2
    assert metrics["dice"]["optic_disc"] >= 0.6 and metrics["dice"]["optic_cup"] >= 0.7, metrics
    assert len(list(tmp_path.glob("overlay_*.png"))) == 2


def test_inference_keeps_size_and_geometry_of_volumes(demo, trained, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    src = demo["ct"] / "images" / "ct_004.nii.gz"
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 5]
    nib.save(nib.Nifti1Image(nib.load(src).get_fdata()[:80, :64, :10].astype(np.float32), affine), inputs / "a.nii.gz")
    (inputs / "broken.png").write_bytes(b"not an image")  # reported and skipped, the rest still written
    out = tmp_path / "out"
    bundle_run(
        "--config_file", str(CONFIGS / "inference.json"), "--support_dir", str(demo["ct"]), "--input_dir",
        str(inputs), "--output_dir", str(out), "--ckpt_path", str(trained / "model.pt"), "--num_support", "2",
        "--objects", "['spleen','liver']", "--box_refine", "true", *TINY,
    )  # fmt: skip
    pred = nib.load(out / "a.nii.gz")
    assert pred.shape == (80, 64, 10) and np.allclose(pred.affine, affine)
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2}  # the support's ids of liver, spleen
    report = json.loads((out / "inference_report.json").read_text())
    assert list(report["failed"]) == [str(inputs / "broken.png")] and "not a readable image" in str(report["failed"])


def test_multi_process_training_with_gloo(demo, tmp_path):
    bundle_run(
        "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']", "--dataset_dir",
        str(demo["fundus"]), "--output_dir", str(tmp_path), "--episodes_per_epoch", "4",
        "--train#trainer#max_epochs", "1", *TINY, torchrun=2,
    )  # fmt: skip
    assert (tmp_path / "model_final.pt").is_file() and (tmp_path / "model.pt").is_file()


# --- in-process: orientation, support choice and bad inputs ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("sam_tiny", "tiny", pretrained=False)


def bright_oracle(model):
    """Replace the model's segmentation by 'bright pixels are object 1': inference must put them where they are."""

    def segment(targets, support, **kwargs):
        return (targets.float().mean(1, keepdim=True) > 128).float() * 20 - 10

    model.segment = segment
    return model


def test_png_inference_keeps_file_orientation_and_size(demo, tmp_path):
    model = bright_oracle(build_model("sam_tiny", "tiny", pretrained=False))
    inputs = tmp_path / "in"
    inputs.mkdir()
    img = np.zeros((40, 70), np.uint8)
    img[5:15, 40:65] = 255  # a wide bright bar near the top right: wrong if rows and columns were swapped
    Image.fromarray(img).save(inputs / "bar.png")
    support = SupportSet(demo["fundus"], 1, objects="optic_cup")
    FolderSegmenter(model, support)(inputs, tmp_path / "out")
    out = np.array(Image.open(tmp_path / "out" / "bar.png"))
    assert out.shape == (40, 70)
    assert np.array_equal(out, (img > 128).astype(np.uint8) * 2)  # value = the support's id of optic_cup


def test_bad_inputs_name_what_is_wrong(demo, tmp_path, tiny_model):
    labels = {1: "optic_disc", 2: "optic_cup"}
    with pytest.raises(ValueError, match=r"\['lens'\].*optic_cup"):
        select_objects(labels, ["optic_cup", "lens"], "x/dataset.json")
    with pytest.raises(ValueError, match="objects is empty"):
        select_objects(labels, [], "x/dataset.json")
    with pytest.raises(ValueError, match="input_dir .* is empty"):
        (tmp_path / "empty").mkdir()
        FolderSegmenter(tiny_model, SupportSet(demo["fundus"], 1))(tmp_path / "empty", tmp_path / "o")
    # a support set whose masks never show a requested object
    folder = tmp_path / "nocup"
    folder.mkdir()
    meta = json.loads((demo["fundus"] / "dataset.json").read_text())
    for item in meta["training"]:
        lbl = np.array(Image.open(demo["fundus"] / item["label"]))
        lbl[lbl == 2] = 1
        name = Path(item["label"]).name
        Image.fromarray(lbl).save(folder / name)
        item["label"] = name
        item["image"] = str(demo["fundus"] / item["image"])
    (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"no training pair shows \['optic_cup'\]"):
        SupportSet(folder, 2, objects=["optic_cup"])
    # image / label size mismatch names both files
    bad = tmp_path / "mismatch"
    bad.mkdir()
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(bad / "img.png")
    Image.fromarray(np.ones((20, 30), np.uint8)).save(bad / "lbl.png")
    (bad / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "x"}, "training": [{"image": "img.png", "label": "lbl.png"}]})
    )
    with pytest.raises(ValueError, match=r"lbl\.png.*does not match image .*img\.png"):
        SupportSet(bad, 1)


def test_checkpoint_from_another_backbone_is_refused(tmp_path, tiny_model):
    path = save_ppg(tiny_model, tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="trained for backbone 'sam_tiny'"):
        build_model("litemedsam", "cpu", ppg_checkpoint=path)


def test_shipped_default_weights_load_into_the_default_model():
    path = ROOT / "bundle" / "models" / "model.pt"
    assert path.stat().st_size < 20 * 2**20
    model = build_model("litemedsam", "cpu", ppg_checkpoint=path)
    assert model.config["backbone"] == "litemedsam"


def test_volume_support_segments_2d_targets_of_another_size(demo, tmp_path, tiny_model):
    """A 3D support (slices of CT-like volumes) and 2D targets of another size: each is brought into the encoder's
    frame on its own, so this is allowed; the output keeps the target's size."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90), dtype=np.uint8)).save(inputs / "x.png")
    report = FolderSegmenter(tiny_model, SupportSet(demo["ct"], 2, objects=["kidney"]))(inputs, tmp_path / "out")
    assert not report["failed"]
    out = np.array(Image.open(tmp_path / "out" / "x.png"))
    assert out.shape == (50, 90) and set(np.unique(out).tolist()) <= {0, 3}


def test_tiles_through_the_bundle_train_and_inference(demo, tmp_path):
    """`tile` in train.json (training crops and validation in tiles) and in inference.json (targets in tiles, the
    support cut into the same tiles): the outputs keep each input's size."""
    out = tmp_path / "train"
    bundle_run(
        "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(demo["fundus"]), "--output_dir", str(out),
        "--episodes_per_epoch", "2", "--train#trainer#max_epochs", "1", "--tile", "64", *TINY, run_id="training",
    )  # fmt: skip
    assert (out / "model.pt").is_file()
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(inputs / "x.png")
    bundle_run(
        "--config_file", str(CONFIGS / "inference.json"), "--support_dir", str(demo["fundus"]), "--input_dir",
        str(inputs), "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(out / "model.pt"), "--num_support",
        "2", "--tile", "64", *TINY,
    )  # fmt: skip
    pred = np.array(Image.open(tmp_path / "out" / "x.png"))
    assert pred.shape == (100, 150) and set(np.unique(pred).tolist()) <= {0, 1, 2, 3}


@pytest.mark.slow  # 25 s: two bundle trainings (`.ci/run` runs it after the default run)
def test_training_repeats_under_its_seed_and_records_it(demo, tmp_path):
    """train.json seeds every run (set_determinism in `initialize`) and writes the seed into the checkpoint."""
    states = []
    for run in ("a", "b"):
        bundle_run(
            "--config_file", str(CONFIGS / "train.json"), "--dataset_dir", str(demo["fundus"]), "--output_dir",
            str(tmp_path / run), "--episodes_per_epoch", "2", "--train#trainer#max_epochs", "1", "--val_interval",
            "5", "--seed", "7", *TINY, run_id="training",
        )  # fmt: skip
        ckpt = torch.load(tmp_path / run / "model_final.pt", weights_only=True)
        assert ckpt["seed"] == 7
        states.append(ckpt["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_broad_training_config_gathers_demo_random_real_and_volume_folders(tmp_path):
    """configs/broad_weights.json: the demo families, every generated task folder found, the real 2D sets, then the
    volume sets, each family with its share of the episodes split evenly over its folders."""
    from monai.bundle import ConfigParser

    for name in ("task_001", "task_000", "notes"):
        (tmp_path / "random" / name).mkdir(parents=True)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(ROOT / "configs" / "broad_weights.json")])
    parser["random_dir"] = str(tmp_path / "random")
    parser["real_dirs"] = ["real/a", "real/b"]
    parser["volume_dirs"] = ["real/v"]
    dirs = parser.get_parsed_content("dataset_dirs")
    random = [str(tmp_path / "random" / t) for t in ("task_000", "task_001")]
    assert dirs == ["data/demo/fundus", "data/demo/ultrasound", "data/demo/ct", *random, "real/a", "real/b", "real/v"]
    weights = parser.get_parsed_content("bank_weights")
    np.testing.assert_allclose(weights, [0.35 / 3] * 3 + [0.15 / 2] * 2 + [0.3 / 2] * 2 + [0.2])
    parser["random_dir"] = str(tmp_path / "absent")
    parser["volume_dirs"] = []
    assert parser.get_parsed_content("dataset_dirs", lazy=False)[3:] == ["real/a", "real/b"]
    assert len(parser.get_parsed_content("bank_weights", lazy=False)) == 5  # the shares of absent families drop out


def _train_in_process(demo, out, stop_after: int | None = None, **overrides):
    """train.json through MONAI's ConfigWorkflow, as `monai.bundle run training` drives it; ``stop_after``: the run is
    stopped (ignite's terminate, as on an interrupt) after that epoch."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    settings = {"dataset_dir": str(demo["fundus"]), "output_dir": str(out), "backbone": "sam_tiny", "preset": "tiny"}
    settings |= {"episodes_per_epoch": 3, "train#trainer#max_epochs": 4, "val_interval": 2, **overrides}
    flow = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), workflow_type="train", run_id="training", **settings)
    flow.initialize()
    trainer = flow.parser.get_parsed_content("train#trainer")
    if stop_after:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda engine: engine.terminate())
    flow.run()
    return trainer


def test_a_stopped_training_resumes_to_the_weights_of_an_uninterrupted_run(demo, tmp_path):
    """Stopped after 2 of 4 epochs and started again in its folder, the run continues from its checkpoint (weights,
    optimizer, learning-rate schedule, episode sampler, random state, best validation) and ends with the same weights
    and the same best checkpoint as a run never stopped."""
    whole = _train_in_process(demo, tmp_path / "whole")
    assert whole.state.epoch == 4 and (tmp_path / "whole" / "checkpoint.pt").is_file()
    first = _train_in_process(demo, tmp_path / "stopped", stop_after=2)
    assert first.state.epoch == 2
    again = _train_in_process(demo, tmp_path / "stopped")
    assert again.state.epoch == 4 and again.state.iteration == 12
    for name in ("model_final.pt", "model.pt"):
        a = torch.load(tmp_path / "whole" / name, weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "stopped" / name, weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(RuntimeError) as refused:  # MONAI's config parser names the component that failed
        _train_in_process(demo, tmp_path / "nothing", resume=True)
    assert "resume: no checkpoint at" in str(refused.value.__cause__)
