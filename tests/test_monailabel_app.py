"""The MONAI Label app driven as 3D Slicer drives it: a real `monailabel start_server` on a free loopback port, over
HTTP (tiny random backbone, generated CT-like studies, some with final labels)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from fastapi import HTTPException
from requests_toolbelt import MultipartDecoder

from ppgseg.data.demo import write_studies

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"liver": 1, "spleen": 2, "kidney": 3}
CONF = {"backbone": "sam_tiny", "preset": "tiny", "finetune_seconds": "2", "bundle": str(ROOT / "bundle")}


@pytest.fixture
def app_code():
    """Import the app's main.py and lib/ in this process, as MONAI Label does (app folder first on sys.path)."""
    sys.path.insert(0, str(ROOT / "monailabel_app"))
    yield
    sys.path.remove(str(ROOT / "monailabel_app"))
    for name in [m for m in sys.modules if m in ("main", "lib") or m.startswith("lib.")]:
        del sys.modules[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_app(tmp: Path) -> Path:
    """The app folder as shipped (the server writes model/, logs/ and bin/ into it)."""
    app = tmp / "app"
    shutil.copytree(ROOT / "monailabel_app", app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    return app


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monailabel")
    studies = write_studies(tmp / "studies", n_studies=12, n_labelled=4, shape=(48, 48, 10), seed=1)
    truth = write_studies(tmp / "truth", n_studies=12, n_labelled=12, shape=(48, 48, 10), seed=1)
    app, port = copy_app(tmp), free_port()
    conf = [x for k, v in CONF.items() for x in ("--conf", k, v)]
    cmd = [Path(sys.executable).with_name("monailabel"), "start_server", "--app", app, "--studies", studies]
    cmd += [*conf, "--conf", "models", "proxy_prompt", "--host", "127.0.0.1", "--port", str(port)]
    log = open(tmp / "server.log", "w")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # an active venv
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if requests.get(f"{url}/info/", timeout=5).ok:
                break
        except requests.ConnectionError:
            pass
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    else:
        raise AssertionError("server did not come up: " + (tmp / "server.log").read_text()[-3000:])
    yield {"url": url, "studies": studies, "truth": truth, "app": app, "tmp": tmp}
    proc.terminate()
    proc.wait(30)


def infer(server, model: str, image: str, params: dict | None = None, label: bytes | None = None):
    files = {"params": (None, json.dumps(params or {}))}
    if label is not None:
        files["label"] = ("label.nii.gz", label)
    return requests.post(f"{server['url']}/infer/{model}", params={"image": image, "output": "all"}, files=files)


def result(resp) -> tuple[dict, np.ndarray, np.ndarray]:
    """A multipart infer answer -> (params, label array, affine)."""
    assert resp.status_code == 200, resp.text[:2000]
    parts = MultipartDecoder(resp.content, resp.headers["content-type"]).parts
    params = json.loads(next(p for p in parts if b'name="params"' in p.headers[b"Content-Disposition"]).content)
    data = next(p for p in parts if b'name="image"' in p.headers[b"Content-Disposition"]).content
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    return params, np.asarray(img.dataobj), img.affine


def nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(array.astype(np.uint8), affine).to_bytes())


def test_info_lists_tasks_and_labels(server):
    info = requests.get(f"{server['url']}/info/").json()
    assert set(info["models"]) == {"proxy_prompt", "proxy_prompt_slices"}
    assert info["models"]["proxy_prompt"]["labels"] == LABELS
    assert info["models"]["proxy_prompt_slices"]["type"] == "scribbles"
    assert set(info["trainers"]) == {"proxy_prompt"} and set(info["strategies"]) == {"least_confident"}
    assert info["labels"] == LABELS
    store = requests.get(f"{server['url']}/datastore/", params={"output": "stats"}).json()
    assert store["total"] == 12 and store["completed"] == 4


def test_auto_segmentation_from_similar_labelled_studies(server):
    source = nib.load(server["studies"] / "ct_007.nii.gz")
    first, label, affine = result(infer(server, "proxy_prompt", "ct_007"))
    assert label.shape == source.shape and np.allclose(affine, source.affine)
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
    assert first["label_names"] == LABELS
    assert len(first["support_ids"]) == 3 and "ct_007" not in first["support_ids"]
    assert "fine-tune" in first["weights"] and not first["support_cached"]  # on the fly: kept only if it helped
    second, again, _ = result(infer(server, "proxy_prompt", "ct_007"))
    assert second["support_cached"] and second["weights"] == first["weights"]
    assert np.array_equal(again, label)
    # a labelled target never supports itself; the Options choose K and the labels
    chosen, only_liver, _ = result(infer(server, "proxy_prompt", "ct_001", {"num_support": 2, "labels": ["liver"]}))
    assert len(chosen["support_ids"]) == 2 and "ct_001" not in chosen["support_ids"]
    assert chosen["label_names"] == {"liver": 1} and set(np.unique(only_liver).tolist()) <= {0, 1}


def test_scribbles_slices_are_the_support_and_come_back_as_drawn(server):
    truth = np.asarray(nib.load(server["truth"] / "labels" / "final" / "ct_009.nii.gz").dataobj)
    affine = nib.load(server["studies"] / "ct_009.nii.gz").affine
    drawn = np.zeros_like(truth)
    drawn[..., [3, 6]] = truth[..., [3, 6]]
    params, label, _ = result(infer(server, "proxy_prompt_slices", "ct_009", label=nifti_bytes(drawn, affine)))
    assert label.shape == truth.shape
    assert np.array_equal(label[..., [3, 6]], drawn[..., [3, 6]])
    assert params["drawn_slices"] == [3, 6] and params["support_pairs"] == 2
    assert params["label_names"] == {n: v for n, v in LABELS.items() if v in np.unique(drawn)}


def test_a_submitted_label_is_saved_and_serves_as_support(server):
    truth = server["truth"] / "labels" / "final" / "ct_008.nii.gz"
    resp = requests.put(
        f"{server['url']}/datastore/label",
        params={"image": "ct_008", "tag": "final"},
        files={"label": ("ct_008.nii.gz", truth.read_bytes()), "params": (None, "{}")},
    )
    assert resp.status_code == 200, resp.text
    assert (server["studies"] / "labels" / "final" / "ct_008.nii.gz").read_bytes() == truth.read_bytes()
    params, _, _ = result(infer(server, "proxy_prompt", "ct_010", {"support_ids": "ct_008"}))
    assert params["support_ids"] == ["ct_008"]


@pytest.mark.parametrize(
    "image, params, label, status",
    [
        ("ct_999", {}, None, 404),  # unknown image id
        ("ct_010", {"support_ids": ["ct_011"]}, None, 404),  # not a labelled study
        ("ct_010", {"support_ids": "../studies/ct_000"}, None, 400),  # leaving the studies folder
        ("ct_010", {"labels": ["liver", "brain"]}, None, 422),  # unknown label name
        ("ct_010", {"num_support": 0}, None, 422),
        ("ct_010", {}, "shape", 422),  # label of another shape
        ("ct_010", {}, "empty", 422),
        ("ct_010", {}, "garbage", 415),  # not an image
        ("ct_010", {}, "value", 422),  # a value no label has
    ],
)
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(server, image, params, label, status):
    affine = np.eye(4)
    uploads = {
        "shape": nifti_bytes(np.ones((8, 8, 4)), affine),
        "empty": nifti_bytes(np.zeros((48, 48, 10)), affine),
        "garbage": b"this is not an image",
        "value": nifti_bytes(np.full((48, 48, 10), 7), affine),
    }
    model = "proxy_prompt_slices" if label else "proxy_prompt"
    resp = infer(server, model, image, params, uploads.get(label))
    assert resp.status_code == status, resp.text
    assert resp.json()["detail"]
    assert requests.get(f"{server['url']}/info/").ok


def test_concurrent_requests_match_single_runs_and_keep_submitted_labels(server):
    studies = ["ct_002"] + [f"ct_{i:03d}" for i in range(4, 12) if i != 8]
    supports = [
        "ct_000,ct_003",
        "ct_000",
        "ct_001",
        "ct_002",
        "ct_003",
        "ct_000,ct_001",
        "ct_002,ct_003",
        "ct_001,ct_003",
    ]
    truth = (server["truth"] / "labels" / "final" / "ct_011.nii.gz").read_bytes()
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(infer, server, "proxy_prompt", s, {"support_ids": sup})
            for s, sup in zip(studies, supports, strict=True)
        ]
        put = pool.submit(
            requests.put,
            f"{server['url']}/datastore/label",
            params={"image": "ct_011", "tag": "final"},
            files={"label": ("ct_011.nii.gz", truth), "params": (None, "{}")},
        )
        together = [result(f.result()) for f in futures]
        assert put.result().status_code == 200
    assert (server["studies"] / "labels" / "final" / "ct_011.nii.gz").read_bytes() == truth
    for s, sup, (params, label, _) in zip(studies, supports, together, strict=True):
        alone_params, alone, _ = result(infer(server, "proxy_prompt", s, {"support_ids": sup}))
        assert alone_params["support_ids"] == sup.split(",") and alone_params["weights"] == params["weights"]
        assert np.array_equal(alone, label), s


def test_active_learning_proposes_an_unlabelled_study(server):
    resp = requests.post(f"{server['url']}/activelearning/least_confident", json={})
    assert resp.status_code == 200, resp.text
    proposal = resp.json()
    unlabelled = requests.get(f"{server['url']}/datastore/", params={"output": "all"}).json()["objects"]
    unlabelled = [k for k, v in unlabelled.items() if "final" not in v.get("labels", {})]
    assert proposal["id"] in unlabelled
    assert proposal["predicted_iou"] == min(proposal["scores"].values())


def test_train_task_runs_through_the_bundle_and_infer_picks_up_its_weights(server):
    resp = requests.post(
        f"{server['url']}/train/proxy_prompt", json={"max_epochs": 1, "episodes_per_epoch": 2, "max_slices": 2}
    )
    assert resp.status_code == 200, resp.text
    for _ in range(600):
        status = requests.get(f"{server['url']}/train/").json()
        if status["status"] in ("DONE", "ERROR"):
            break
        time.sleep(0.5)
    assert status["status"] == "DONE", status
    stats = requests.get(f"{server['url']}/info/").json()["train_stats"]["proxy_prompt"]
    assert stats["epoch"] == 1 and 0 <= stats["best_metric"] <= 1
    params, _, _ = result(infer(server, "proxy_prompt", "ct_005"))
    assert params["weights"].startswith("trained in this app")


def test_an_empty_datastore_or_default_host_is_refused(tmp_path, app_code):
    from main import ProxyPromptApp, bind_address, check_bind_address

    studies = write_studies(tmp_path / "studies", n_studies=2, n_labelled=0, shape=(32, 32, 4))
    app = ProxyPromptApp(str(copy_app(tmp_path)), str(studies), dict(CONF))
    with pytest.raises(HTTPException) as err:
        app.infer({"model": "proxy_prompt", "image": "ct_000"})
    assert err.value.status_code == 409 and "final label" in err.value.detail
    assert bind_address(["monailabel", "start_server", "--host", "127.0.0.1"]) == "127.0.0.1"
    with pytest.raises(RuntimeError, match="--host 127.0.0.1"):
        check_bind_address(bind_address(["monailabel", "start_server", "--app", "x"]), auth=False)


def test_label_names_must_be_contiguous(tmp_path, app_code):
    from lib.configs.proxy_prompt import parse_labels

    assert parse_labels("liver, spleen", tmp_path) == {"liver": 1, "spleen": 2}
    assert parse_labels('{"spleen": 2, "liver": 1}', tmp_path) == {"liver": 1, "spleen": 2}
    with pytest.raises(ValueError, match="1..N"):
        parse_labels('{"liver": 1, "kidney": 3}', tmp_path)
    with pytest.raises(ValueError, match="--conf labels"):
        parse_labels(None, tmp_path)


def test_2d_images_are_segmented_in_their_own_format_and_size(tmp_path, app_code):
    """In-process (no server): a datastore of PNG fundus-like images, two with final labels."""
    from PIL import Image

    from ppgseg.data.demo import write_family

    family = write_family(tmp_path / "data", "fundus", n_train=3, n_val=0, n_test=0, seed=2)
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i, item in enumerate(json.loads((family / "dataset.json").read_text())["training"]):
        shutil.copy(family / item["image"], studies)
        if i < 2:
            shutil.copy(family / item["label"], studies / "labels" / "final")
    from main import ProxyPromptApp

    conf = {**CONF, "labels": "optic_disc,optic_cup,vessel"}
    app = ProxyPromptApp(str(copy_app(tmp_path)), str(studies), conf)
    out = app.infer({"model": "proxy_prompt", "image": "fundus_002", "labels": "optic_disc,optic_cup"})
    written = np.asarray(Image.open(out["file"]))
    assert out["file"].endswith(".png") and written.shape == (256, 256)
    assert set(np.unique(written).tolist()) <= {0, 1, 2}
    assert out["params"]["label_names"] == {"optic_disc": 1, "optic_cup": 2}
    assert sorted(out["params"]["support_ids"]) == ["fundus_000", "fundus_001"]
