"""Write the MONAI Model Zoo form of `bundle/`: a bundle that runs after download, with no project package installed.

    python scripts/export_bundle.py OUT [--name ppgseg_fewshot_segmentation] [--weights-url URL] [--zip]

What it writes into ``OUT/<name>/`` (the repository's `bundle/` stays what developers run; nothing is kept twice by
hand, everything below is derived from it and from the `ppgseg` package):
- ``scripts/ppgseg/``: the model code, vendored as the bundle's own ``scripts`` package (the zoo's CI and MONAI's
  `ConfigWorkflow` put the bundle root on ``sys.path``); ``configs/*.json`` import and ``_target_`` into
  ``scripts.ppgseg``; ``bundle_root`` is ``"."`` and the data folders default under ``/workspace/data``;
- ``models/model.pt`` and ``large_files.yml`` naming it with its SHA-256 and ``--weights-url`` (where the release
  hosts it; by default the exported file's own ``file://`` URL, for a local check);
- ``configs/metadata.json`` (pretty-formatted), ``configs/logging.conf``, ``docs/``, ``LICENSE``;
- ``ci/unit_tests/test_<name>.py``: the zoo-style unit test to put into the zoo's ``ci/unit_tests/``.
With ``--zip``, also ``OUT/<name>.zip``, laid out as the zoo's release zips (the bundle folder at the top).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE, PACKAGE = ROOT / "bundle", ROOT / "ppgseg"
CONFIGS = ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "train_video.json",
           "inference_video.json")  # fmt: skip
# where a zoo user's data and outputs go, instead of the repository's data/ and runs/
DATA_DIRS = {"dataset_dir": "/workspace/data/dataset", "support_dir": "/workspace/data/support"}
OUTPUT_DIRS = {"train.json": "runs/train", "evaluate.json": "eval", "inference.json": "eval",
               "train_video.json": "runs/train_video", "inference_video.json": "eval_video"}  # fmt: skip


def vendor(text: str) -> str:
    """A config's text with every reference to the ``ppgseg`` package pointed at the bundle's ``scripts.ppgseg``."""
    text = re.sub(r"\bimport ppgseg\b", "import scripts.ppgseg", text)
    return re.sub(r"(?<![\w.])ppgseg\.", "scripts.ppgseg.", text)


def export_config(src: Path, dst: Path) -> None:
    """One config in zoo form: vendored imports and targets, ``bundle_root`` ".", data under /workspace/data,
    outputs under the bundle root."""
    config = json.loads(vendor(src.read_text()))
    if "imports" in config:  # MONAI binds "import a.b" to the name "a.b": the expressions' "scripts" needs its own
        config["imports"] = ["$import scripts", *config["imports"]]
    if "bundle_root" in config:
        config["bundle_root"] = "."
    for key, value in DATA_DIRS.items():
        if isinstance(config.get(key), str) and not config[key].startswith(("$", "@")):
            config[key] = value
    if "output_dir" in config and src.name in OUTPUT_DIRS:
        config["output_dir"] = f"$@bundle_root + '/{OUTPUT_DIRS[src.name]}'"
    dst.write_text(json.dumps(config, indent=4) + "\n")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(out: Path, name: str, weights_url: str | None = None, make_zip: bool = False) -> Path:
    """Write the zoo bundle ``out/name`` (replacing one there) and return its path."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"bundle name must be lower-case letters, digits and '_' (zoo convention), got {name!r}")
    dst = out / name
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "configs").mkdir(parents=True)
    for file in CONFIGS:
        export_config(BUNDLE / "configs" / file, dst / "configs" / file)
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    (dst / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
    shutil.copy(BUNDLE / "configs" / "logging.conf", dst / "configs" / "logging.conf")
    shutil.copy(BUNDLE / "LICENSE", dst / "LICENSE")
    shutil.copytree(BUNDLE / "docs", dst / "docs")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PACKAGE, dst / "scripts" / "ppgseg", ignore=ignore)
    (dst / "scripts" / "__init__.py").write_text('"""The bundle\'s custom code: the ppgseg package, vendored."""\n')
    (dst / "models").mkdir()
    weights = dst / "models" / "model.pt"
    shutil.copy(BUNDLE / "models" / "model.pt", weights)
    url = weights_url or weights.resolve().as_uri()
    (dst / "large_files.yml").write_text(
        "large_files:\n"
        f'  - path: "models/model.pt"\n    url: "{url}"\n    hash_val: "{sha256(weights)}"\n    hash_type: "sha256"\n'
    )
    tests = dst / "ci" / "unit_tests"
    tests.mkdir(parents=True)
    template = (BUNDLE / "zoo" / "test_bundle.py").read_text()
    (tests / f"test_{name}.py").write_text(template.replace("BUNDLE_NAME", name))
    if make_zip:
        compress(dst, out / f"{name}.zip")
    return dst


def compress(bundle: Path, zip_path: Path) -> Path:
    """Zip a bundle as the zoo's releases are zipped: the bundle folder at the top, file entries only, one fixed
    timestamp, deflate at level 9 (the zoo's unit test under ci/ is not part of the bundle)."""
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.relative_to(bundle).parts[0] != "ci")
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for path in files:
            info = zipfile.ZipInfo(str(Path(bundle.name) / path.relative_to(bundle)), date_time=(2022, 5, 30, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, path.read_bytes(), compresslevel=9)
    return zip_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--name", default="ppgseg_fewshot_segmentation")
    p.add_argument("--weights-url", default=None, help="where the release hosts models/model.pt (large_files.yml)")
    p.add_argument("--zip", action="store_true", help="also write OUT/<name>.zip as the zoo's release zips")
    a = p.parse_args()
    print(f"wrote {export(a.out, a.name, a.weights_url, a.zip)}")


if __name__ == "__main__":
    main()
