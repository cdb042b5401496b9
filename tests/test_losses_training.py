"""Every loss family of issue 7 trains through the Trainer behind ``train.py`` from its preset
(small synthetic runs, tests/losses_train_check.py in fresh processes), and evaluate.py scores
pairs with PFE's mutual likelihood score and reports MagFace-style feature norms."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from checks import run_check

from facerec_tf.config import ConfigError, resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "losses_train_check.py"


def train(folder, *cases) -> dict:
    return run_check("losses_train_check.py", folder, *cases, timeout=600)


def decreases(values, n=4) -> bool:
    """Mean of the last ``n`` steps below the mean of the first ``n`` (batch losses are
    noisy step to step; the runs are deterministic)."""
    return float(np.mean(values[-n:])) < float(np.mean(values[:n]))


@pytest.mark.slow
def test_adaptive_heads_and_angular_triplet_train_from_their_presets(tmp_path):
    r = train(
        tmp_path, "magface", "curricularface", "adaface", "sphereface_annealed", "angular_triplet"
    )
    for name, result in r.items():
        assert all(np.isfinite(result["loss"])), (name, result)
        assert decreases(result["loss"]), (name, result["loss"])
    assert set(r["magface"]["terms"]) == {"softmax", "magface_g"}
    assert len(set(r["magface"]["terms"]["magface_g"])) > 1  # g(a) follows the norms
    assert r["angular_triplet"]["terms"] == {}  # no classifier: the triplet loss alone


@pytest.mark.slow
def test_center_loss_facenet_distillation_and_pfe_train_from_their_presets(tmp_path):
    r = train(tmp_path, "center_loss", "facenet_mobilenet", "vargfacenet_distill", "pfe")
    for name, result in r.items():
        assert all(np.isfinite(result["loss"])), (name, result)
    center = r["center_loss"]
    assert decreases(center["loss"]) and decreases(center["terms"]["center"])
    facenet = r["facenet_mobilenet"]  # triplet (semi-hard) + the joint softmax classifier
    assert set(facenet["terms"]) == {"softmax", "triplet"} and decreases(facenet["loss"])
    assert decreases(r["vargfacenet_distill"]["terms"]["distill"])
    pfe = r["pfe"]
    assert decreases(pfe["loss"]) and pfe["backbone_unchanged"]  # only the PFE head trains
    # in-training verification scores the held-out pairs with MLS (a barely trained backbone
    # here: tests/test_pfe.py checks what the variances mean)
    assert 0.0 < pfe["verification"]["synthetic_holdout"] <= 1.0

    # evaluate.py --pfe --quality on a .bin written from held-out synthetic faces
    from facerec_tf.data.synthetic import write_synthetic_bin

    target = tmp_path / "holdout.bin"
    write_synthetic_bin(str(target), 60, image_size=(32, 32))
    out = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            "--model",
            str(tmp_path / "pfe.keras"),
            "--bin",
            str(target),
            "--pfe",
            "--quality",
            "--report",
            str(tmp_path / "report.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PFE Keras model" in out.stdout and "[holdout][0]Accuracy-Flip:" in out.stdout
    assert "[holdout] quality (feature norm) mean" in out.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["_meta"]["pfe"] is True and report["_meta"]["quality"]["holdout"]["count"] == 120


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["head.name=magface", "head.margin=0.3"], "head.margin", "not used by head 'magface'"),
        (["head.name=arcface", "head.lambda_g=20"], "head.lambda_g", "not used by head"),
        (["loss.triplet_weight=1"], "data.images_per_identity", "several images per identity"),
        (
            ["data.images_per_identity=5", "data.batch_size=64"],
            "data.images_per_identity",
            "not a multiple of 5",
        ),
        (["head.name=none"], "head.name", "loss.triplet_weight > 0 or loss.pfe"),
        (["loss.pfe=true", "data.images_per_identity=4"], "head.name", "head.name=none"),
        (
            ["head.partial_fc=true", "loss.center_weight=0.01"],
            "head.partial_fc",
            "margin softmax only",
        ),
        (["head.name=adaface", "head.partial_fc=true"], "head.name", "not supported"),
    ],
)
def test_loss_config_errors_name_the_key(overrides, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve("ms1mv2_r50", overrides)
    assert info.value.key == key


def test_missing_teacher_and_pretrained_backbone_are_reported_when_the_run_is_built(tmp_path):
    from facerec_tf.training.objective import Objective
    from facerec_tf.training.saved_models import load_backbone
    from facerec_tf.training.task import FaceRecognitionTask

    small = ["model.backbone=iresnet10", "data.image_size=32,32", "model.embedding_size=16"]
    task = FaceRecognitionTask(resolve("ms1mv2_vargfacenet_distill", small))
    with pytest.raises(ConfigError, match="needs a teacher") as info:
        Objective(task, task.build_backbone(), task.build_head())
    assert info.value.key == "loss.teacher"
    task = FaceRecognitionTask(resolve("ms1mv2_r50_pfe", small))
    with pytest.raises(ConfigError, match=r"set model\.pretrained") as info:
        Objective(task, task.build_backbone(), None)
    with pytest.raises(ConfigError, match="model not found") as info:
        load_backbone(str(tmp_path), key="loss.teacher")
    assert info.value.key == "loss.teacher" and str(tmp_path) in str(info.value)


def test_every_preset_resolves_and_head_names_agree():
    from facerec_tf.config import HEAD_KEYS, list_presets
    from facerec_tf.heads import list_heads

    assert set(HEAD_KEYS) == {*list_heads(), "none"}

    for name in list_presets():
        resolve(name)  # validation runs on every preset
