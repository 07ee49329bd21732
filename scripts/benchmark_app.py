"""End-to-end latency of the MONAI Label app over HTTP for one generated CT-like study, against the backbone with a
box prompt on the same slices, measured in one run on this machine.

Starts `monailabel start_server` on a free loopback port with the embedded default (LiteMedSAM, `cpu` preset,
bundle default weights), asks `proxy_prompt` for the study twice (the first request chooses the support by
similarity, fine-tunes on the fly and encodes the support; the second reuses all of it), then times LiteMedSAM with
one box per slice on the same slices in this process while the server idles.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
import torch
from requests_toolbelt import MultipartDecoder

from ppgseg.backbones import build_litemedsam
from ppgseg.data.demo import write_studies

ROOT = Path(__file__).resolve().parents[1]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--labelled", type=int, default=3, help="labelled studies in the datastore")
    parser.add_argument("--finetune-seconds", default="60")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ppgseg_bench_"))
    studies = write_studies(
        work / "studies", n_studies=args.labelled + 1, n_labelled=args.labelled + 1,
        shape=(args.size, args.size, args.slices), seed=5,
    )  # fmt: skip
    target = f"ct_{args.labelled:03d}"
    truth = np.asarray(nib.load(studies / "labels" / "final" / f"{target}.nii.gz").dataobj)
    (studies / "labels" / "final" / f"{target}.nii.gz").unlink()  # the study to segment has no label
    app = work / "app"
    shutil.copytree(ROOT / "monailabel_app", app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(Path(sys.executable).with_name("monailabel")), "start_server", "--app", str(app), "--studies"]
    cmd += [str(studies), "--conf", "models", "proxy_prompt", "--conf", "bundle", str(ROOT / "bundle")]
    cmd += ["--conf", "finetune_seconds", args.finetune_seconds, "--host", "127.0.0.1", "--port", str(port)]
    log = open(work / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if requests.get(f"{url}/info/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        print(f"{args.slices} slices of {args.size}x{args.size}, {args.labelled} labelled studies, torch threads "
              f"{torch.get_num_threads()}; server log {work / 'server.log'}")  # fmt: skip
        runs = []
        for name in ("first request", "second request"):
            start = time.perf_counter()
            resp = requests.post(f"{url}/infer/proxy_prompt", params={"image": target, "output": "all"}, timeout=3600)
            seconds = time.perf_counter() - start
            resp.raise_for_status()
            parts = MultipartDecoder(resp.content, resp.headers["content-type"]).parts
            params = json.loads(next(p for p in parts if b'name="params"' in p.headers[b"Content-Disposition"]).content)
            data = next(p for p in parts if b'name="image"' in p.headers[b"Content-Disposition"]).content
            label = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj)
            scores = {n: dice(label == v, truth == v) for n, v in params["label_names"].items()}
            runs.append((name, seconds, params, scores))
    finally:
        server.terminate()
        server.wait(60)

    backbone = build_litemedsam().eval()
    volume = torch.as_tensor(np.asarray(nib.load(studies / f"{target}.nii.gz").dataobj))
    lo, hi = volume.min(), volume.max()
    start = time.perf_counter()
    with torch.no_grad():
        for z in range(volume.shape[2]):
            image = ((volume[..., z] - lo) / (hi - lo) * 255).expand(1, 3, -1, -1)
            backbone.predict_box(image, torch.tensor([[0.0, 0.0, args.size - 1.0, args.size - 1.0]]))
    box = time.perf_counter() - start
    print(f"backbone with box, {args.slices} slices: {box:.1f} s")
    for name, seconds, params, scores in runs:
        dices = ", ".join(f"{n} {d:.3f}" for n, d in scores.items())
        print(f"{name}: {seconds:.1f} s = {seconds / box:.2f}x backbone-with-box; support cached "
              f"{params['support_cached']}; prepare {params['prepare_seconds']} s, segment "
              f"{params['segment_seconds']} s; Dice {dices}")  # fmt: skip
        print(f"  weights: {params['weights']}; support {params['support_ids']}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
