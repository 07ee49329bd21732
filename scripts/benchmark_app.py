"""End-to-end latency of the MONAI Label app over HTTP for generated CT-like studies, against the backbone with a
box prompt on the same slices, measured in one run on this machine.

Starts `monailabel start_server` on a free loopback port with the embedded default (LiteMedSAM, `cpu` preset,
bundle default weights) and asks, as 3D Slicer would:
1. `proxy_prompt` for a study, cold: labelled studies chosen by similarity, then (the default registration route)
   registered onto it, or (``--conf auto_route fixed``) a support set fine-tuned on the fly; everything encoded;
2. the same again: everything cached;
3. a new study uploaded to the datastore (`PUT /datastore/image`), which the app encodes in the background, then
   `proxy_prompt` on it with the same support set: only the PPG and the mask decoder run;
4. Scribbles `proxy_prompt_slices` on the study of (1) with the liver corrected on two slices, as Slicer uploads it
   (every segment, `label_info`, `selected_label_name`).
Then times LiteMedSAM with one box per slice on the same slices in this process while the server idles.
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
from ppgseg.data.generated.families import write_studies

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"liver": 1, "spleen": 2, "kidney": 3}  # the generated studies' dataset.json


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--labelled", type=int, default=3, help="labelled studies in the datastore")
    parser.add_argument("--finetune-seconds", default="60")
    parser.add_argument("--atlas-finetune-episodes", default="400", help="the registration route's fine-tune (0: off)")
    parser.add_argument("--z-stride", default="4", help="the app's z_stride (1: decode every slice)")
    parser.add_argument("--auto-route", default="registration", choices=["registration", "fixed"])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ppgseg_bench_"))
    studies = write_studies(
        work / "studies", n_studies=args.labelled + 2, n_labelled=args.labelled + 2,
        shape=(args.size, args.size, args.slices), seed=5,
    )  # fmt: skip
    target, new = f"ct_{args.labelled:03d}", f"ct_{args.labelled + 1:03d}"
    truths = {}
    for t in (target, new):  # the studies to segment have no label
        truths[t] = np.asarray(nib.load(studies / "labels" / "final" / f"{t}.nii.gz").dataobj)
        (studies / "labels" / "final" / f"{t}.nii.gz").unlink()
    upload = work / f"{new}.nii.gz"
    shutil.move(studies / f"{new}.nii.gz", upload)  # arrives while the server runs
    app = work / "app"
    shutil.copytree(ROOT / "monailabel_app", app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.setdefault("MALLOC_ARENA_MAX", "1")  # as monailabel_app/README.md starts the server
    cmd = [str(Path(sys.executable).with_name("monailabel")), "start_server", "--app", str(app), "--studies"]
    cmd += [str(studies), "--conf", "models", "proxy_prompt", "--conf", "bundle", str(ROOT / "bundle")]
    cmd += ["--conf", "finetune_seconds", args.finetune_seconds, "--conf", "z_stride", args.z_stride]
    cmd += ["--conf", "auto_route", args.auto_route, "--conf", "atlas_finetune_episodes", args.atlas_finetune_episodes]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
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

        def infer(image: str, params: dict, name: str, label: bytes | None = None) -> tuple[np.ndarray, dict]:
            files = {"params": (None, json.dumps(params))}
            if label is not None:
                files["label"] = ("label.nii.gz", label)
            model = "proxy_prompt_slices" if label is not None else "proxy_prompt"
            start = time.perf_counter()
            resp = requests.post(
                f"{url}/infer/{model}", params={"image": image, "output": "all"}, files=files, timeout=3600
            )
            seconds = time.perf_counter() - start
            resp.raise_for_status()
            parts = MultipartDecoder(resp.content, resp.headers["content-type"]).parts
            params = json.loads(next(p for p in parts if b'name="params"' in p.headers[b"Content-Disposition"]).content)
            data = next(p for p in parts if b'name="image"' in p.headers[b"Content-Disposition"]).content
            out = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj)
            ids = {n: LABELS[n] for n in params["label_names"]}  # the answer's values are 1..N in its names' order
            scores = {n: dice(out == v, truths[image] == ids[n]) for n, v in params["label_names"].items()}
            runs.append((name, seconds, params, scores))
            print(f"{name}: {seconds:.1f} s ({', '.join(f'{n} {d:.3f}' for n, d in scores.items())})", flush=True)
            return out, params

        runs = []
        first, params = infer(target, {}, "1. cold: new support set, study not encoded")
        infer(target, {}, "2. same study again")
        features = app / "model" / "cache" / "features"
        encoded = len(list(features.glob("*.pt")))  # the studies encoded so far (atlases too, on that route)
        with open(upload, "rb") as f:
            requests.put(
                f"{url}/datastore/image", params={"image": new}, files={"file": (upload.name, f)}
            ).raise_for_status()
        waited = time.perf_counter()
        while len(list(features.glob("*.pt"))) <= encoded and time.perf_counter() - waited < 1800:
            time.sleep(1)
        print(f"{new} uploaded and encoded in the background in {time.perf_counter() - waited:.0f} s")
        support = ",".join(params["support_ids"])
        infer(new, {"support_ids": support}, "3. new study, encoded in the background, same support set")
        # Slicer shows (1); the user redraws the liver on two slices and presses Update with liver selected
        names = [n for n, _ in sorted(params["label_names"].items(), key=lambda kv: kv[1])]
        segments = [(n, first == i + 1) for i, n in enumerate(names)]
        liver = dict(segments)["liver"].copy()
        for z in (args.slices // 3, 2 * args.slices // 3):
            liver[..., z] = truths[target][..., z] == LABELS["liver"]
        segments = [(n, liver if n == "liver" else m & ~liver) for n, m in segments]
        export = np.zeros(first.shape, np.uint8)
        for i, (_, m) in enumerate(segments):
            export[m] = i + 1
        affine = nib.load(studies / f"{target}.nii.gz").affine
        scribbles = gzip.compress(nib.Nifti1Image(export, affine).to_bytes())
        info = [{"name": n, "id": i + 1} for i, (n, _) in enumerate(segments)]
        infer(target, {"label_info": info, "selected_label_name": "liver"}, "4. Scribbles: liver corrected on 2 slices",
              scribbles)  # fmt: skip
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
        print(f"{name}: {seconds:.1f} s = {seconds / box:.2f}x backbone-with-box; {params.get('route', '-')}; "
              f"support cached {params.get('support_cached', '-')}, study encoding "
              f"{params.get('study_encoding', '-')}; prepare {params.get('prepare_seconds', '-')} s, registration "
              f"{params.get('registration_seconds', '-')} s ({params.get('registrations_cached', '-')} kept), "
              f"segment {params['segment_seconds']} s; Dice {dices}")  # fmt: skip
        print(f"  weights: {params['weights']}; support {params.get('support_ids', params.get('drawn_slices'))}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from ppgseg.runtime import pad_heap

    pad_heap()  # freed heap memory kept: CPU forwards stop paying page faults
    main()
