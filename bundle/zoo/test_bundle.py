"""Model Zoo unit test of the BUNDLE_NAME bundle (goes to the zoo's ci/unit_tests/test_BUNDLE_NAME.py, where the zoo's
runner finds it; written by scripts/export_bundle.py). Generated data: bright disks on noise, one object."""

import json
import os
import shutil
import sys
import tempfile
import unittest

import numpy as np
from monai.bundle import ConfigWorkflow
from PIL import Image
from utils import check_workflow

BUNDLE_ROOT = "models/BUNDLE_NAME"
sys.path.insert(0, BUNDLE_ROOT)  # the bundle's scripts/ package (imported by train.json's `initialize`)


def write_dataset(root, n=6, size=96, seed=0):
    """A data-contract folder: images/, labels/ and a dataset.json with training, validation and test lists."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "labels"))
    entries = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(30, size - 30), rng.integers(30, size - 30), rng.integers(12, 22)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        image = np.clip(60 + rng.normal(0, 8, (size, size)) + 140 * disk, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, "images", f"case{i}.png"))
        Image.fromarray(disk.astype(np.uint8)).save(os.path.join(root, "labels", f"case{i}.png"))
        entries.append({"image": f"images/case{i}.png", "label": f"labels/case{i}.png"})
    meta = {"labels": {"0": "background", "1": "disk"}, "training": entries[:4], "validation": entries[4:5],
            "test": entries[5:]}  # fmt: skip
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)


def test_order(test_name1, test_name2):
    def get_order(name):
        return 1 if "train" in name else 2 if "infer" in name else 3

    return get_order(test_name1) - get_order(test_name2)


class TestFewShotBundle(unittest.TestCase):
    def setUp(self):
        self.data_dir = tempfile.mkdtemp()
        self.out_dir = tempfile.mkdtemp()
        write_dataset(self.data_dir)

    def tearDown(self):
        shutil.rmtree(self.data_dir)
        shutil.rmtree(self.out_dir)

    def workflow(self, workflow_type, configs, **override):
        return ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=[os.path.join(BUNDLE_ROOT, "configs", c) for c in configs],
            logging_file=os.path.join(BUNDLE_ROOT, "configs/logging.conf"),
            meta_file=os.path.join(BUNDLE_ROOT, "configs/metadata.json"),
            bundle_root=BUNDLE_ROOT,
            **override,
        )

    def test_train_eval_config(self):
        override = {"dataset_dir": self.data_dir, "output_dir": self.out_dir, "episodes_per_epoch": 2,
                    "train#trainer#max_epochs": 1, "num_support": 2}  # fmt: skip
        check_workflow(self.workflow("train", ["train.json"], **override), check_properties=True)
        self.assertTrue(os.path.isfile(os.path.join(self.out_dir, "model_final.pt")))
        evaluate = self.workflow("train", ["train.json", "evaluate.json"], **override)
        check_workflow(evaluate, check_properties=False)
        self.assertTrue(os.path.isfile(os.path.join(self.out_dir, "metrics.json")))

    def test_infer_config(self):
        override = {"dataset_dir": os.path.join(self.data_dir, "images"), "support_dir": self.data_dir,
                    "output_dir": self.out_dir, "num_support": 2}  # fmt: skip
        check_workflow(self.workflow("infer", ["inference.json"], **override), check_properties=True)
        self.assertEqual(len([f for f in os.listdir(self.out_dir) if f.endswith(".png")]), 6)


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
