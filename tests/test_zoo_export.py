"""The Model Zoo form of the bundle as a user meets it: exported, zipped as the zoo zips, downloaded with
`monai.bundle download`, then run where the project's package cannot be imported."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppgseg.data.generated.families import write_family

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"
NAME = "ppgseg_fewshot_segmentation"

# Runs `monai.bundle` (or a property check) with every import of the project's package refused.
BLOCKED = """
import runpy, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ppgseg" or name.startswith("ppgseg."):
            raise ImportError(f"{name} is blocked: the bundle must run on its own scripts/ package")

sys.meta_path.insert(0, Block())
if sys.argv[1] == "check":  # check WORKFLOW_TYPE BUNDLE CONFIG [ID=VALUE ...]
    from monai.bundle import ConfigWorkflow
    kind, root, config = sys.argv[2:5]
    override = dict(a.split("=", 1) for a in sys.argv[5:])
    sys.path.insert(0, root)  # as the zoo's unit tests do
    wf = ConfigWorkflow(workflow_type=kind, config_file=f"{root}/configs/{config}",
                        meta_file=f"{root}/configs/metadata.json", bundle_root=root, **override)
    wf.initialize()
    missing = wf.check_properties()
    print("missing properties:", missing)
    sys.exit(1 if missing else 0)
sys.path[0] = ""  # as `python -m monai.bundle` has it: the working directory, not this file's
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory) -> Path:
    """Export with --zip, then download the zip as a user does."""
    out = tmp_path_factory.mktemp("zoo")
    run(str(ROOT / "scripts" / "export_bundle.py"), str(out / "export"), "--zip", cwd=out)
    bundles = out / "bundles"
    zip_url = (out / "export" / f"{NAME}.zip").as_uri()
    run("-m", "monai.bundle", "download", "--name", NAME, "--url", zip_url, "--bundle_dir", str(bundles), cwd=out)
    (out / "blocked.py").write_text(BLOCKED)
    return bundles / NAME


def test_metadata_passes_the_zoo_schema_offline():
    from monai.bundle import verify_metadata

    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA} (the zoo's metadata schema, shipped beside the repository) is not here")
    meta_file = ROOT / "bundle" / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))  # the file exists: nothing is downloaded
    meta = json.loads(meta_file.read_text())
    assert "ppgseg" not in meta["required_packages_version"] and "optional_packages_version" not in meta
    assert "mamba-ssm" not in meta["required_packages_version"] and "sam2" not in meta["required_packages_version"]
    assert meta["version"] in meta["changelog"]


def test_export_is_in_zoo_form(downloaded):
    configs = {p.name: json.loads(p.read_text()) for p in (downloaded / "configs").glob("*.json")}
    assert configs["inference.json"]["bundle_root"] == "." and configs["train.json"]["bundle_root"] == "."
    text = "\n".join(p.read_text() for p in (downloaded / "configs").glob("*.json"))
    assert "scripts.ppgseg." in text
    assert not re.findall(r"(?<![\w.])ppgseg\.|import ppgseg", text)  # every reference is to the vendored code
    assert (downloaded / "scripts" / "ppgseg" / "build.py").is_file() and (
        downloaded / "scripts" / "__init__.py"
    ).exists()
    large = (downloaded / "large_files.yml").read_text()
    digest = hashlib.sha256((downloaded / "models" / "model.pt").read_bytes()).hexdigest()
    assert 'path: "models/model.pt"' in large and f'hash_val: "{digest}"' in large and "sha256" in large
    assert not (downloaded / "ci").exists()  # the zoo unit test is exported beside the bundle, not zipped into it
    with zipfile.ZipFile(downloaded.parent / f"{NAME}.zip") as z:
        infos = z.infolist()
    assert all(i.filename.startswith(f"{NAME}/") and not i.is_dir() for i in infos)
    assert {i.date_time for i in infos} == {(2022, 5, 30, 0, 0, 0)}


@pytest.mark.slow  # 70 s: trains and segments through the vendored bundle (`.ci/run` runs it after the default run)
def test_downloaded_bundle_runs_without_the_project_package(downloaded, tmp_path):
    data = write_family(tmp_path / "data", "fundus", n_train=3, n_val=1, n_test=2, seed=3)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((data / "images").glob("*.png"))[:2]:
        shutil.copy(f, inputs / f.name)
    # run from the bundle root, as the zoo's commands are (its scripts/ package is then importable)
    root, blocked = str(downloaded), str(downloaded.parent.parent / "blocked.py")
    meta = ["--meta_file", f"{root}/configs/metadata.json", "--bundle_root", root]
    # inference with the shipped default (LiteMedSAM and the bundle's own weights)
    run(
        blocked, "run", "--config_file", f"{root}/configs/inference.json", *meta, "--dataset_dir", str(inputs),
        "--support_dir", str(data), "--output_dir", str(tmp_path / "out"), "--num_support", "2", cwd=downloaded,
    )  # fmt: skip
    for f in inputs.iterdir():
        pred = np.array(Image.open(tmp_path / "out" / f.name))
        assert pred.shape == np.array(Image.open(f)).shape[:2] and set(np.unique(pred).tolist()) <= {0, 1, 2, 3}
        assert pred.any()
    # one short training epoch (tiny random backbone, to stay quick)
    run(
        blocked, "run", "training", "--config_file", f"{root}/configs/train.json", *meta, "--dataset_dir",
        str(data), "--output_dir", str(tmp_path / "train"), "--episodes_per_epoch", "2", "--train#trainer#max_epochs",
        "1", "--backbone", "sam_tiny", "--preset", "tiny", "--num_support", "2", cwd=downloaded,
    )  # fmt: skip
    import torch

    state = torch.load(tmp_path / "train" / "model_final.pt", weights_only=True)["state_dict"]
    assert state and all(k.startswith("generator.") or ".lora_" in k for k in state)
    # the zoo's workflow property checks, on the downloaded configs
    run(blocked, "check", "infer", root, "inference.json", f"dataset_dir={inputs}", f"support_dir={data}", cwd=tmp_path)
    run(blocked, "check", "train", root, "train.json", f"dataset_dir={data}", cwd=tmp_path)
